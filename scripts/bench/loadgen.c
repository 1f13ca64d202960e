/*
 * loadgen: a single-threaded epoll WebSocket load generator for
 * scripts/bench_gateway.py.
 *
 * Raw sockets, a minimal RFC 6455 client (handshake without Accept-key
 * check, masked client frames, unfragmented server frames, ping -> pong),
 * many connections in one thread. Loopback only (127.0.0.1).
 *
 * Protocols (--proto):
 *   apix   first-frame auth {"op":"auth","id":1,"token":T} (or, with
 *          --header-auth, "Authorization: Bearer T" on the upgrade and the
 *          "connected" push), subscribe {"op":"subscribe","id":2,
 *          "channel":"bench.x"}, publish {"op":"publish","id":N,
 *          "channel":"bench.x","data":{...}}.
 *   plain  the peers' minimal protocol: {"op":"subscribe","id":2},
 *          {"op":"publish","id":N,"data":{...}}; replies {"id":N,"ok":true}.
 * Event pushes are recognised by the "bseq" field of the published data,
 * which also carries "bt", the send time (CLOCK_MONOTONIC, microseconds).
 *
 * Modes:
 *   fanout    --conns N subscribers + 1 publisher. Either --window W: at most
 *             W publishes in flight, a publish leaving flight when it has
 *             been acknowledged AND delivered to all N subscribers
 *             (end-to-end); or --rate R publishes/s (latency runs).
 *             Counts deliveries and publish->deliver latency during
 *             --duration after --warmup. --phases "r5:6,w2,w32" runs several
 *             such phases on the same connections (each drains the previous
 *             one's publishes first, max 60 s) and prints one line for each;
 *             "WINDOW <phase> <secs>" marks the start of each measured window.
 *   idle      opens --conns connections (authenticated for apix), prints
 *             "READY n secs", holds --hold seconds answering pings, prints
 *             "HELD pings", then waits for a line (or EOF) on stdin (max 30 s)
 *             before closing, so the caller can read the server's RSS.
 *   soak      --conns N subscribers + 1 publisher at --rate R publishes/s
 *             for --duration seconds, then a drain of at most 15 s. Every
 *             subscriber must see every sequence number once, in order:
 *             gaps count as missed, repeats or going back as disordered; a
 *             subscriber that is closed or disconnected counts as a close
 *             (and what it had not received by then as missed). Prints "TICK secs
 *             published acked delivered missed disordered closes ready pings"
 *             every --report seconds (default 30), so the caller can sample
 *             the server's RSS in step.
 *   connrate  keeps --concurrency connection set-ups going: connect,
 *             upgrade (apix: with the Bearer token, complete at the
 *             "connected" push, i.e. after RS256 verification), then reset;
 *             counts completions during --duration after --warmup.
 *
 * Every mode prints one JSON line of results last, including its own CPU use
 * and run-queue wait (and the server's, with --server-pid, from
 * /proc/PID/stat and /proc/PID/schedstat) over the measured interval, as
 * shares of one core. Every loop is bounded by --timeout seconds in total.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { PROTO_APIX, PROTO_PLAIN };
enum { MODE_FANOUT, MODE_IDLE, MODE_CONNRATE, MODE_SOAK };
enum { ROLE_SUB, ROLE_PUB, ROLE_IDLE, ROLE_CHURN };
enum { ST_FREE, ST_CONNECTING, ST_HS, ST_AUTH, ST_CONNECTED_WAIT, ST_SUB, ST_READY, ST_DEAD };

typedef struct {
    int fd;
    int state;
    int role;
    int epout;
    long expect; /* soak: the next sequence number this subscriber should see */
    char *in;
    size_t inlen, incap;
    char *out;
    size_t outlen, outoff, outcap;
    uint64_t t0;
} conn_t;

/* ---- configuration ---- */
static int mode = MODE_FANOUT, proto = PROTO_APIX, port = 0, header_auth = 0;
static const char *path = "/ws", *token = "";
/* --tokens-file: one token per line; every new connection takes the next one
 * (round robin), so the server verifies a distinct signature per connection. */
static char **tokens = NULL;
static long ntokens = 0, next_token = 0;

static const char *take_token(void) {
    if (ntokens == 0) return token;
    const char *t = tokens[next_token];
    next_token = (next_token + 1) % ntokens;
    return t;
}

static int load_tokens(const char *file) {
    FILE *f = fopen(file, "r");
    if (!f) return -1;
    size_t cap = 1024;
    tokens = malloc(cap * sizeof *tokens);
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        size_t len = strcspn(line, "\r\n");
        if (len == 0) continue;
        line[len] = 0;
        if ((size_t)ntokens == cap) {
            cap *= 2;
            tokens = realloc(tokens, cap * sizeof *tokens);
        }
        tokens[ntokens++] = strdup(line);
    }
    fclose(f);
    return ntokens > 0 ? 0 : -1;
}
static char *phases = NULL;
static long nconns = 10, concurrency = 100, window = 2;
static double rate = 0, warmup = 1, duration = 3, hold = 5, total_timeout = 120, report = 30;
static int payload = 200, server_pid = 0;

/* ---- state ---- */
static int ep;
static conn_t *conns;
static long nslots;
static long opened, pending, ready, failed;
static long server_closes, last_close_code = -1, pings;
static char first_error[256];
/* soak counters; the publisher and its next sequence number (defined below) */
static long soak_missed, soak_disordered, soak_closes;
static conn_t *publisher;
static long next_seq;
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint32_t rnd32(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)rng_state;
}

static void note_error(const char *fmt, const char *detail) {
    if (!first_error[0]) snprintf(first_error, sizeof first_error, fmt, detail);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (!q) {
        fprintf(stderr, "loadgen: out of memory\n");
        exit(3);
    }
    return q;
}

/* ---- latency samples (microseconds) ---- */
typedef struct {
    uint32_t *v;
    size_t n, cap;
} samples_t;

static void sample_add(samples_t *s, uint64_t us) {
    if (s->n == s->cap) {
        if (s->cap >= 64u * 1024 * 1024) return; /* bounded */
        s->cap = s->cap ? s->cap * 2 : 65536;
        s->v = xrealloc(s->v, s->cap * sizeof(uint32_t));
    }
    s->v[s->n++] = us > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)us;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static void print_samples(const char *name, samples_t *s) {
    if (!s->n) {
        printf("\"%s\":{\"n\":0}", name);
        return;
    }
    qsort(s->v, s->n, sizeof(uint32_t), cmp_u32);
#define PCT(p) s->v[(size_t)((double)(s->n - 1) * (p))]
    printf("\"%s\":{\"n\":%zu,\"p50\":%u,\"p90\":%u,\"p99\":%u,\"p999\":%u,\"max\":%u}", name, s->n,
           PCT(0.50), PCT(0.90), PCT(0.99), PCT(0.999), s->v[s->n - 1]);
#undef PCT
}

/* ---- CPU accounting ---- */
static double self_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static double proc_cpu(int pid) {
    if (pid <= 0) return -1;
    char fn[64], buf[4096];
    snprintf(fn, sizeof fn, "/proc/%d/stat", pid);
    FILE *f = fopen(fn, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    unsigned long ut = 0, st = 0;
    /* fields after ") ": state(3) ... utime(14) stime(15) */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2) return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* Seconds a task waited on a run queue (CPU contention), from
   /proc/<pid>/schedstat (main thread); "self" for this process. */
static double run_wait(int pid) {
    char fn[64];
    if (pid == 0) snprintf(fn, sizeof fn, "/proc/self/schedstat");
    else snprintf(fn, sizeof fn, "/proc/%d/schedstat", pid);
    FILE *f = fopen(fn, "r");
    if (!f) return -1;
    unsigned long long run = 0, wait = 0;
    int ok = fscanf(f, "%llu %llu", &run, &wait) == 2;
    fclose(f);
    return ok ? wait / 1e9 : -1;
}

static double w_self0, w_srv0;
static void mark_waits(void) {
    w_self0 = run_wait(0);
    w_srv0 = server_pid > 0 ? run_wait(server_pid) : -1;
}

/* ---- I/O helpers ---- */
static void ep_mod(conn_t *c, int want_out) {
    if (c->fd < 0 || c->epout == want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.u64 = (uint64_t)(c - conns)};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->epout = want_out;
}

static void conn_reset_close(conn_t *c) {
    if (c->fd >= 0) {
        struct linger lg = {1, 0}; /* RST: no TIME_WAIT on either side */
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(c->fd);
    }
    c->fd = -1;
    c->inlen = 0;
    c->outlen = c->outoff = 0;
    c->epout = 0;
}

static void conn_fail(conn_t *c, const char *why) {
    note_error("%s", why);
    if (c->state != ST_READY) {
        failed++;
        if (c->state != ST_FREE && c->state != ST_DEAD) pending--;
    } else {
        ready--;
        if (mode == MODE_SOAK) {
            soak_closes++;
            if (c->role == ROLE_SUB && publisher) soak_missed += next_seq - c->expect;
        }
    }
    conn_reset_close(c);
    c->state = ST_DEAD;
}

static int flush_out(conn_t *c) {
    while (c->outoff < c->outlen) {
        ssize_t n = send(c->fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);
        if (n > 0) {
            c->outoff += (size_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            ep_mod(c, 1);
            return 0;
        }
        if (n < 0 && errno == EINTR) continue;
        conn_fail(c, "send failed");
        return -1;
    }
    c->outlen = c->outoff = 0;
    ep_mod(c, 0);
    return 0;
}

static void out_reserve(conn_t *c, size_t more) {
    if (c->outlen + more > c->outcap) {
        if (c->outoff) {
            memmove(c->out, c->out + c->outoff, c->outlen - c->outoff);
            c->outlen -= c->outoff;
            c->outoff = 0;
        }
        if (c->outlen + more > c->outcap) {
            c->outcap = (c->outlen + more) * 2;
            c->out = xrealloc(c->out, c->outcap);
        }
    }
}

static void queue_raw(conn_t *c, const char *p, size_t n) {
    out_reserve(c, n);
    memcpy(c->out + c->outlen, p, n);
    c->outlen += n;
}

/* One masked client frame; flushed at once when the socket takes it. */
static int send_frame(conn_t *c, int opcode, const char *p, size_t n) {
    if (c->fd < 0) return -1;
    unsigned char hdr[14];
    size_t h = 0;
    hdr[h++] = (unsigned char)(0x80 | opcode);
    if (n < 126) {
        hdr[h++] = (unsigned char)(0x80 | n);
    } else if (n < 65536) {
        hdr[h++] = 0x80 | 126;
        hdr[h++] = (unsigned char)(n >> 8);
        hdr[h++] = (unsigned char)n;
    } else {
        hdr[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) hdr[h++] = (unsigned char)((uint64_t)n >> (8 * i));
    }
    uint32_t key = rnd32();
    memcpy(hdr + h, &key, 4);
    h += 4;
    out_reserve(c, h + n);
    memcpy(c->out + c->outlen, hdr, h);
    c->outlen += h;
    const unsigned char *mk = (const unsigned char *)&key;
    unsigned char *dst = (unsigned char *)c->out + c->outlen;
    for (size_t i = 0; i < n; i++) dst[i] = (unsigned char)p[i] ^ mk[i & 3];
    c->outlen += n;
    return flush_out(c);
}

static int send_text(conn_t *c, const char *s) { return send_frame(c, 1, s, strlen(s)); }

/* ---- the opener ---- */
static struct sockaddr_in target;

static int conn_open(conn_t *c, int role) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    c->role = role;
    c->inlen = 0;
    c->outlen = c->outoff = 0;
    c->epout = 1;
    c->t0 = now_ns();
    pending++;
    opened++;
    if (c->fd < 0) {
        c->state = ST_CONNECTING;
        conn_fail(c, "socket() failed (ulimit -n?)");
        return -1;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = ST_CONNECTING;
    int r = connect(c->fd, (struct sockaddr *)&target, sizeof target);
    if (r < 0 && errno != EINPROGRESS) {
        conn_fail(c, "connect failed");
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = (uint64_t)(c - conns)};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}

static void send_handshake(conn_t *c) {
    char buf[4096];
    int n;
    if (header_auth && proto == PROTO_APIX)
        n = snprintf(buf, sizeof buf,
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n\r\n",
                     path, port, take_token());
    else
        n = snprintf(buf, sizeof buf,
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     path, port);
    queue_raw(c, buf, (size_t)n);
    c->state = ST_HS;
    flush_out(c);
}

/* ---- fanout bookkeeping ---- */
#define RING 8192
static long ring_seq[RING];
static uint32_t ring_count[RING];
static uint8_t ring_acked[RING];
static uint64_t ring_sent[RING];
static long next_seq, inflight, completed, completed_in_window, stalled, published_in_window;
static long acks, pub_errors;
static long nsubs_target;
static long delivered_in_window, delivered_total;
static uint64_t win_start, win_end;

static samples_t lat, setup_lat;
static char padbuf[65536];

static void ring_complete(long seq) {
    int slot = (int)(seq % RING);
    ring_seq[slot] = -1;
    inflight--;
    completed++;
    uint64_t t = now_ns();
    if (t >= win_start && t < win_end) completed_in_window++;
}

static void ring_check(long seq) {
    int slot = (int)(seq % RING);
    if (ring_seq[slot] != seq) return;
    if (ring_acked[slot] && ring_count[slot] >= (uint32_t)nsubs_target) ring_complete(seq);
}

static conn_t *publisher;

static void publish_one(void) {
    conn_t *c = publisher;
    if (!c || c->state != ST_READY) return;
    long seq = next_seq++;
    int slot = (int)(seq % RING);
    if (ring_seq[slot] >= 0) { /* an ancient in-flight entry: give it up */
        ring_seq[slot] = -1;
        inflight--;
        stalled++;
    }
    uint64_t t = now_ns();
    ring_seq[slot] = seq;
    ring_count[slot] = 0;
    ring_acked[slot] = 0;
    ring_sent[slot] = t;
    inflight++;
    if (t >= win_start && t < win_end) published_in_window++;
    /* data is ~`payload` bytes: {"bseq":S,"bt":T,"pad":"xxx"} */
    char head[128];
    int hn = snprintf(head, sizeof head, "{\"bseq\":%ld,\"bt\":%llu,\"pad\":\"", seq,
                      (unsigned long long)(t / 1000));
    int padn = payload - hn - 2;
    if (padn < 0) padn = 0;
    if (padn > (int)sizeof padbuf - 1) padn = (int)sizeof padbuf - 1;
    static char msg[70000];
    int n;
    if (proto == PROTO_APIX)
        n = snprintf(msg, sizeof msg, "{\"op\":\"publish\",\"id\":%ld,\"channel\":\"bench.x\",\"data\":%s%.*s\"}}",
                     seq + 100, head, padn, padbuf);
    else
        n = snprintf(msg, sizeof msg, "{\"op\":\"publish\",\"id\":%ld,\"data\":%s%.*s\"}}", seq + 100, head,
                     padn, padbuf);
    send_frame(c, 1, msg, (size_t)n);
}

static long parse_long_after(const char *p, size_t n, const char *key, int *ok) {
    const char *k = memmem(p, n, key, strlen(key));
    *ok = 0;
    if (!k) return 0;
    k += strlen(key);
    const char *end = p + n;
    while (k < end && *k == ' ') k++;
    long v = 0;
    int any = 0;
    while (k < end && *k >= '0' && *k <= '9') {
        v = v * 10 + (*k - '0');
        k++;
        any = 1;
    }
    *ok = any;
    return v;
}

/* ---- soak bookkeeping ---- */

static void soak_seen(conn_t *c, long seq) {
    if (seq == c->expect) {
        c->expect++;
    } else if (seq > c->expect) {
        soak_missed += seq - c->expect;
        c->expect = seq + 1;
    } else {
        soak_disordered++;
    }
}

/* ---- connection lifecycle ---- */
static void connrate_done(conn_t *c);

static void become_ready(conn_t *c) {
    c->state = ST_READY;
    pending--;
    ready++;
    sample_add(&setup_lat, (now_ns() - c->t0) / 1000);
    if (mode == MODE_CONNRATE) connrate_done(c);
}

static void on_open(conn_t *c) {
    if (proto == PROTO_APIX) {
        if (header_auth) {
            c->state = ST_CONNECTED_WAIT;
            return;
        }
        char buf[4096];
        snprintf(buf, sizeof buf, "{\"op\":\"auth\",\"id\":1,\"token\":\"%s\"}", take_token());
        c->state = ST_AUTH;
        send_text(c, buf);
        return;
    }
    if (c->role == ROLE_SUB) {
        c->state = ST_SUB;
        send_text(c, "{\"op\":\"subscribe\",\"id\":2}");
        return;
    }
    become_ready(c);
}

static void on_text(conn_t *c, const char *p, size_t n) {
    int ok;
    switch (c->state) {
    case ST_AUTH:
        if (!memmem(p, n, "\"ok\":true", 9)) {
            char tmp[200];
            snprintf(tmp, sizeof tmp, "auth refused: %.*s", (int)(n < 150 ? n : 150), p);
            conn_fail(c, tmp);
            return;
        }
        if (c->role == ROLE_SUB) {
            c->state = ST_SUB;
            send_text(c, "{\"op\":\"subscribe\",\"id\":2,\"channel\":\"bench.x\"}");
        } else {
            become_ready(c);
        }
        return;
    case ST_CONNECTED_WAIT:
        if (memmem(p, n, "\"connected\"", 11)) become_ready(c);
        else conn_fail(c, "expected the connected push");
        return;
    case ST_SUB:
        if (memmem(p, n, "\"bseq\":", 7)) return; /* an event before the reply: ignore */
        if (!memmem(p, n, "\"ok\":true", 9)) {
            char tmp[200];
            snprintf(tmp, sizeof tmp, "subscribe refused: %.*s", (int)(n < 150 ? n : 150), p);
            conn_fail(c, tmp);
            return;
        }
        become_ready(c);
        return;
    case ST_READY:
        break;
    default:
        return;
    }
    if (c->role == ROLE_SUB) {
        long seq = parse_long_after(p, n, "\"bseq\":", &ok);
        if (!ok) return;
        uint64_t t = now_ns();
        delivered_total++;
        if (t >= win_start && t < win_end) {
            delivered_in_window++;
            long bt = parse_long_after(p, n, "\"bt\":", &ok);
            if (ok) sample_add(&lat, t / 1000 - (uint64_t)bt);
        }
        if (mode == MODE_SOAK) soak_seen(c, seq);
        int slot = (int)(seq % RING);
        if (ring_seq[slot] == seq) {
            ring_count[slot]++;
            ring_check(seq);
        }
        return;
    }
    if (c->role == ROLE_PUB) {
        long id = parse_long_after(p, n, "{\"id\":", &ok);
        if (!ok || id < 100) return;
        acks++;
        if (!memmem(p, n, "\"ok\":true", 9)) {
            pub_errors++;
            char tmp[200];
            snprintf(tmp, sizeof tmp, "publish refused: %.*s", (int)(n < 150 ? n : 150), p);
            note_error("%s", tmp);
        }
        long seq = id - 100;
        int slot = (int)(seq % RING);
        if (ring_seq[slot] == seq) {
            ring_acked[slot] = 1;
            ring_check(seq);
        }
    }
}

/* Parse whatever complete frames are buffered. Returns -1 if the conn died. */
static int process_input(conn_t *c) {
    size_t off = 0;
    if (c->state == ST_HS) {
        char *end = memmem(c->in, c->inlen, "\r\n\r\n", 4);
        if (!end) return 0;
        if (c->inlen < 12 || memcmp(c->in + 9, "101", 3) != 0) {
            char tmp[200];
            char *eol = memchr(c->in, '\r', c->inlen);
            snprintf(tmp, sizeof tmp, "handshake refused: %.*s", (int)(eol ? eol - c->in : 40), c->in);
            conn_fail(c, tmp);
            return -1;
        }
        off = (size_t)(end - c->in) + 4;
        on_open(c);
        if (c->fd < 0) return -1;
    }
    while (c->inlen - off >= 2) {
        const unsigned char *b = (const unsigned char *)c->in + off;
        size_t avail = c->inlen - off;
        int opcode = b[0] & 0x0F;
        uint64_t len = b[1] & 0x7F;
        size_t h = 2;
        if (b[1] & 0x80) h += 4; /* servers must not mask; tolerate */
        if (len == 126) {
            if (avail < 4) break;
            len = ((uint64_t)b[2] << 8) | b[3];
            h += 2;
        } else if (len == 127) {
            if (avail < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = (len << 8) | b[2 + i];
            h += 8;
        }
        if (avail < h + len) {
            if (h + len > c->incap) {
                c->incap = h + len + 65536;
                /* rebase before growing so `off` stays valid */
                memmove(c->in, c->in + off, avail);
                c->inlen = avail;
                off = 0;
                c->in = xrealloc(c->in, c->incap);
            }
            break;
        }
        const char *payload_p = (const char *)b + h;
        if (opcode == 1 || opcode == 0) {
            on_text(c, payload_p, (size_t)len);
        } else if (opcode == 9) {
            pings++;
            send_frame(c, 0xA, payload_p, (size_t)len);
        } else if (opcode == 8) {
            long code = len >= 2 ? (((unsigned char)payload_p[0]) << 8 | (unsigned char)payload_p[1]) : 1005;
            if (mode != MODE_CONNRATE) {
                server_closes++;
                last_close_code = code;
            }
            char tmp[64];
            snprintf(tmp, sizeof tmp, "server closed with %ld", code);
            conn_fail(c, tmp);
            return -1;
        }
        if (c->fd < 0) return -1;
        off += h + (size_t)len;
    }
    if (off) {
        memmove(c->in, c->in + off, c->inlen - off);
        c->inlen -= off;
    }
    return 0;
}

static void on_readable(conn_t *c) {
    for (int rounds = 0; rounds < 8; rounds++) {
        if (c->incap - c->inlen < 16384) {
            c->incap = c->incap ? c->incap * 2 : 65536;
            c->in = xrealloc(c->in, c->incap);
        }
        ssize_t n = recv(c->fd, c->in + c->inlen, c->incap - c->inlen, 0);
        if (n > 0) {
            c->inlen += (size_t)n;
            if (process_input(c) < 0) return;
            if ((size_t)n < 16384) return;
            continue;
        }
        if (n == 0) {
            conn_fail(c, "server closed the TCP connection");
            return;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR) continue;
        conn_fail(c, "recv failed");
        return;
    }
}

static void on_event(conn_t *c, uint32_t events) {
    if (c->fd < 0) return;
    if (c->state == ST_CONNECTING) {
        if (events & (EPOLLERR | EPOLLHUP)) {
            conn_fail(c, "connect refused");
            return;
        }
        if (events & EPOLLOUT) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                conn_fail(c, "connect failed");
                return;
            }
            send_handshake(c);
        }
        return;
    }
    if ((events & EPOLLOUT) && flush_out(c) < 0) return;
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
}

/* ---- connrate ---- */
static long churn_done_in_window, churn_done_total;

static void connrate_done(conn_t *c) {
    uint64_t t = now_ns();
    churn_done_total++;
    if (t >= win_start && t < win_end) churn_done_in_window++;
    ready--;
    conn_reset_close(c);
    c->state = ST_FREE;
}

/* ---- main loop ---- */
static int loop_once(int timeout_ms) {
    struct epoll_event evs[1024];
    int n = epoll_wait(ep, evs, 1024, timeout_ms);
    if (n < 0 && errno != EINTR) {
        perror("epoll_wait");
        exit(3);
    }
    for (int i = 0; i < n; i++) {
        uint64_t idx = evs[i].data.u64;
        if (idx == UINT64_MAX) return 1; /* stdin */
        on_event(&conns[idx], evs[i].events);
    }
    return 0;
}

static void open_more(long total, int role_first, int role_rest) {
    while (opened < total && pending < concurrency) {
        conn_t *c = &conns[opened];
        conn_open(c, opened == 0 ? role_first : role_rest);
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen fanout|idle|connrate|soak --port P [--proto apix|plain] [--token T]\n"
            "  [--tokens-file F (one token per line, a new one per connection)]\n"
            "  [--header-auth] [--path /ws] [--conns N] [--concurrency C] [--window W]\n"
            "  [--rate R] [--phases r5:6,w2,w32] [--payload B] [--warmup S] [--duration S] [--hold S]\n"
            "  [--report S (soak)]\n"
            "  [--timeout S] [--server-pid PID]\n");
    exit(2);
}

static void print_common(double cpu_self, double cpu_server, double wall);

static long subscribers_behind(void) {
    long behind = 0;
    for (long i = 1; i < nslots; i++)
        if (conns[i].state == ST_READY && conns[i].expect < next_seq) behind++;
    return behind;
}

static void print_tick(uint64_t since) {
    printf("TICK %.1f %ld %ld %ld %ld %ld %ld %ld %ld\n", (now_ns() - since) / 1e9, next_seq, acks,
           delivered_total, soak_missed, soak_disordered, soak_closes, ready - 1, pings);
    fflush(stdout);
}

/* The soak run: publish at --rate for --duration, reporting every --report
   seconds; drain (max 15 s); count what every live subscriber still lacks
   as missed. Exit status 1 when anything was missed, disordered or closed. */
static int soak(double setup_secs, uint64_t deadline) {
    publisher = &conns[0];
    printf("START %ld %.3f\n", ready - 1, setup_secs);
    fflush(stdout);
    uint64_t t0 = now_ns();
    uint64_t end = t0 + (uint64_t)(duration * 1e9);
    uint64_t interval = (uint64_t)(1e9 / (rate > 0 ? rate : 1));
    uint64_t report_ns = (uint64_t)((report > 0 ? report : 30) * 1e9);
    uint64_t next_pub = t0, next_report = t0 + report_ns;
    win_start = t0;
    win_end = UINT64_MAX;
    double c0 = self_cpu(), s0 = proc_cpu(server_pid);
    mark_waits();
    while (now_ns() < end && now_ns() < deadline) {
        uint64_t t = now_ns();
        while (t >= next_pub && publisher->state == ST_READY) {
            publish_one();
            next_pub += interval;
        }
        if (t >= next_report) {
            print_tick(t0);
            next_report += report_ns;
        }
        uint64_t wake = next_pub < next_report ? next_pub : next_report;
        int64_t wait = ((int64_t)wake - (int64_t)now_ns()) / 1000000;
        loop_once(wait < 0 ? 0 : wait > 50 ? 50 : (int)wait);
    }
    double wall = (now_ns() - t0) / 1e9;
    double c1 = self_cpu(), s1 = proc_cpu(server_pid);
    uint64_t drain_end = now_ns() + 15ull * 1000000000ull;
    while (now_ns() < drain_end && now_ns() < deadline && (subscribers_behind() || acks < next_seq))
        loop_once(20);
    long behind = subscribers_behind(), tail = 0;
    for (long i = 1; i < nslots; i++)
        if (conns[i].state == ST_READY) tail += next_seq - conns[i].expect;
    soak_missed += tail;
    print_tick(t0);
    int publisher_alive = publisher->state == ST_READY;
    printf("{\"mode\":\"soak\",\"subs\":%ld,\"rate\":%.2f,\"duration\":%.3f,\"setup_s\":%.3f,"
           "\"published\":%ld,\"acks\":%ld,\"pub_errors\":%ld,\"delivered\":%ld,"
           "\"expected\":%ld,\"missed\":%ld,\"missed_at_end\":%ld,\"behind_at_end\":%ld,"
           "\"disordered\":%ld,\"closes\":%ld,\"subs_ready_at_end\":%ld,"
           "\"publisher_alive\":%s,",
           nconns, rate, wall, setup_secs, next_seq, acks, pub_errors, delivered_total,
           next_seq * nconns, soak_missed, tail, behind, soak_disordered, soak_closes, ready - 1,
           publisher_alive ? "true" : "false");
    print_samples("latency_us", &lat);
    printf(",");
    print_common(c1 - c0, (s0 >= 0 && s1 >= 0) ? s1 - s0 : -1, wall);
    printf("}\n");
    fflush(stdout);
    for (long i = 0; i < nslots; i++) conn_reset_close(&conns[i]);
    int clean = publisher_alive && soak_missed == 0 && soak_disordered == 0 && soak_closes == 0 &&
                pub_errors == 0;
    return clean ? 0 : 1;
}

static void print_common(double cpu_self, double cpu_server, double wall) {
    double ws = run_wait(0), wv = server_pid > 0 ? run_wait(server_pid) : -1;
    printf("\"loadgen_cpu\":%.3f,\"server_cpu\":%.3f,\"loadgen_runq_wait\":%.3f,"
           "\"server_runq_wait\":%.3f,\"errors\":%ld,\"server_closes\":%ld,"
           "\"last_close_code\":%ld,\"pings\":%ld,\"first_error\":\"",
           wall > 0 ? cpu_self / wall : 0, (cpu_server >= 0 && wall > 0) ? cpu_server / wall : -1,
           (wall > 0 && ws >= 0 && w_self0 >= 0) ? (ws - w_self0) / wall : -1,
           (wall > 0 && wv >= 0 && w_srv0 >= 0) ? (wv - w_srv0) / wall : -1, failed,
           server_closes, last_close_code, pings);
    for (const char *p = first_error; *p; p++) {
        if (*p == '"' || *p == '\\') putchar('\\');
        if ((unsigned char)*p >= 0x20) putchar(*p);
    }
    printf("\"");
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    if (!strcmp(argv[1], "fanout")) mode = MODE_FANOUT;
    else if (!strcmp(argv[1], "idle")) mode = MODE_IDLE;
    else if (!strcmp(argv[1], "connrate")) mode = MODE_CONNRATE;
    else if (!strcmp(argv[1], "soak")) mode = MODE_SOAK;
    else usage();
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (!strcmp(a, name) && v && (i++, 1))
        if (!strcmp(a, "--header-auth")) header_auth = 1;
        else if (OPT("--port")) port = atoi(v);
        else if (OPT("--proto")) proto = !strcmp(v, "apix") ? PROTO_APIX : PROTO_PLAIN;
        else if (OPT("--token")) token = v;
        else if (OPT("--tokens-file")) {
            if (load_tokens(v) < 0) {
                fprintf(stderr, "loadgen: cannot read tokens from %s\n", v);
                return 2;
            }
        }
        else if (OPT("--path")) path = v;
        else if (OPT("--conns")) nconns = atol(v);
        else if (OPT("--concurrency")) concurrency = atol(v);
        else if (OPT("--window")) window = atol(v);
        else if (OPT("--rate")) rate = atof(v);
        else if (OPT("--phases")) phases = (char *)v;
        else if (OPT("--payload")) payload = atoi(v);
        else if (OPT("--warmup")) warmup = atof(v);
        else if (OPT("--duration")) duration = atof(v);
        else if (OPT("--hold")) hold = atof(v);
        else if (OPT("--report")) report = atof(v);
        else if (OPT("--timeout")) total_timeout = atof(v);
        else if (OPT("--server-pid")) server_pid = atoi(v);
        else usage();
#undef OPT
    }
    if (!port) usage();
    if (window < 1) window = 1;
    if (window > RING / 2) window = RING / 2;
    if (strlen(token) > 3000) {
        fprintf(stderr, "loadgen: token too long\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    memset(padbuf, 'x', sizeof padbuf - 1);
    for (int i = 0; i < RING; i++) ring_seq[i] = -1;
    rng_state ^= (uint64_t)getpid() << 20 ^ now_ns();
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)port);
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ep = epoll_create1(0);

    uint64_t t_begin = now_ns();
    uint64_t deadline = t_begin + (uint64_t)(total_timeout * 1e9);
    win_start = win_end = UINT64_MAX;

    if (mode == MODE_CONNRATE) {
        nslots = concurrency;
        conns = calloc((size_t)nslots, sizeof(conn_t));
        for (long i = 0; i < nslots; i++) conns[i].fd = -1;
        win_start = t_begin + (uint64_t)(warmup * 1e9);
        win_end = win_start + (uint64_t)(duration * 1e9);
        double c0 = 0, s0 = 0;
        int marked = 0;
        while (now_ns() < win_end && now_ns() < deadline) {
            for (long i = 0; i < nslots; i++)
                if (conns[i].state == ST_FREE || conns[i].state == ST_DEAD) conn_open(&conns[i], ROLE_CHURN);
            if (!marked && now_ns() >= win_start) {
                c0 = self_cpu();
                s0 = proc_cpu(server_pid);
                mark_waits();
                marked = 1;
            }
            loop_once(5);
        }
        double c1 = self_cpu(), s1 = proc_cpu(server_pid);
        double wall = duration;
        for (long i = 0; i < nslots; i++) conn_reset_close(&conns[i]);
        printf("{\"mode\":\"connrate\",\"concurrency\":%ld,\"duration\":%.3f,\"completed\":%ld,"
               "\"conns_per_s\":%.1f,",
               concurrency, duration, churn_done_in_window, churn_done_in_window / duration);
        print_samples("setup_us", &setup_lat);
        printf(",");
        print_common(c1 - c0, (s0 >= 0 && s1 >= 0) ? s1 - s0 : -1, wall);
        printf("}\n");
        return 0;
    }

    int with_publisher = mode == MODE_FANOUT || mode == MODE_SOAK;
    long total = with_publisher ? nconns + 1 : nconns;
    nslots = total;
    conns = calloc((size_t)nslots, sizeof(conn_t));
    for (long i = 0; i < nslots; i++) conns[i].fd = -1;
    nsubs_target = nconns;
    int role_first = with_publisher ? ROLE_PUB : ROLE_IDLE;
    int role_rest = with_publisher ? ROLE_SUB : ROLE_IDLE;

    /* set-up phase: open everything, bounded concurrency */
    uint64_t setup_start = now_ns();
    while ((opened < total || pending > 0) && now_ns() < deadline) {
        open_more(total, role_first, role_rest);
        loop_once(50);
    }
    double setup_secs = (now_ns() - setup_start) / 1e9;
    if (ready < total) {
        /* connections failed (or timed out): report and stop */
        printf("{\"mode\":\"%s\",\"setup_failed\":true,\"ready\":%ld,\"wanted\":%ld,",
               mode == MODE_FANOUT ? "fanout" : mode == MODE_SOAK ? "soak" : "idle", ready, total);
        print_common(0, -1, 0);
        printf("}\n");
        for (long i = 0; i < nslots; i++) conn_reset_close(&conns[i]);
        return 1;
    }

    if (mode == MODE_IDLE) {
        printf("READY %ld %.3f\n", ready, setup_secs);
        fflush(stdout);
        uint64_t hold_end = now_ns() + (uint64_t)(hold * 1e9);
        while (now_ns() < hold_end && now_ns() < deadline) loop_once(50);
        printf("HELD %ld %ld\n", pings, ready);
        fflush(stdout);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
        int watch_stdin = epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) == 0;
        uint64_t wait_end = now_ns() + (watch_stdin ? 30ull : 0ull) * 1000000000ull;
        while (now_ns() < wait_end && now_ns() < deadline)
            if (loop_once(50)) break;
        long still = ready;
        for (long i = 0; i < nslots; i++) conn_reset_close(&conns[i]);
        printf("{\"mode\":\"idle\",\"conns\":%ld,\"ready_at_end\":%ld,\"setup_s\":%.3f,"
               "\"setup_conns_per_s\":%.1f,",
               nconns, still, setup_secs, nconns / (setup_secs > 0 ? setup_secs : 1));
        print_samples("setup_us", &setup_lat);
        printf(",");
        print_common(0, -1, 0);
        printf("}\n");
        return 0;
    }

    if (mode == MODE_SOAK) return soak(setup_secs, deadline);

    /* fanout: one line of results per phase (--phases "r5:6,w2,w32"; default
       from --window/--rate), on the same subscribers */
    publisher = &conns[0];
    char phases_buf[256];
    if (!phases) {
        if (rate > 0) snprintf(phases_buf, sizeof phases_buf, "r%g", rate);
        else snprintf(phases_buf, sizeof phases_buf, "w%ld", window);
        phases = phases_buf;
    } else {
        snprintf(phases_buf, sizeof phases_buf, "%s", phases);
        phases = phases_buf;
    }
    int status = 0;
    for (char *save = NULL, *ph = strtok_r(phases_buf, ",", &save); ph; ph = strtok_r(NULL, ",", &save)) {
        double ph_duration = duration;
        char *colon = strchr(ph, ':');
        if (colon) ph_duration = atof(colon + 1);
        if (ph[0] == 'r') {
            rate = atof(ph + 1);
            window = 0;
        } else {
            rate = 0;
            window = atol(ph + 1);
            if (window < 1) window = 1;
            if (window > RING / 2) window = RING / 2;
        }
        /* drain what the previous phase left in flight (bounded) */
        uint64_t drain_end = now_ns() + 60ull * 1000000000ull;
        win_start = win_end = UINT64_MAX;
        while (inflight > 0 && now_ns() < drain_end && now_ns() < deadline && publisher->state == ST_READY)
            loop_once(20);
        long drained_left = inflight;
        for (int i = 0; i < RING; i++) ring_seq[i] = -1;
        inflight = 0;
        completed_in_window = published_in_window = delivered_in_window = 0;
        stalled = 0;
        lat.n = 0;
        uint64_t t0 = now_ns();
        win_start = t0 + (uint64_t)(warmup * 1e9);
        win_end = win_start + (uint64_t)(ph_duration * 1e9);
        uint64_t interval = rate > 0 ? (uint64_t)(1e9 / rate) : 0;
        uint64_t next_pub = t0;
        double c0 = 0, s0 = 0, c1 = 0, s1 = 0;
        int marked = 0;
        long max_inflight_rate = RING / 2;
        while (now_ns() < deadline) {
            uint64_t t = now_ns();
            if (!marked && t >= win_start) {
                c0 = self_cpu();
                s0 = proc_cpu(server_pid);
                mark_waits();
                marked = 1;
                printf("WINDOW %s %.3f\n", ph, ph_duration);
                fflush(stdout);
            }
            if (t >= win_end) break;
            if (publisher->state != ST_READY) break;
            if (interval) {
                while (t >= next_pub && inflight < max_inflight_rate) {
                    publish_one();
                    next_pub += interval;
                }
            } else {
                while (inflight < window && publisher->state == ST_READY) publish_one();
                /* a publish stuck for 60 s (lost deliveries) gives its slot up */
                for (long q = next_seq - 1; q >= 0 && q >= next_seq - window - 1; q--) {
                    int slot = (int)(q % RING);
                    if (ring_seq[slot] == q && t > ring_sent[slot] && t - ring_sent[slot] > 60000000000ull) {
                        ring_seq[slot] = -1;
                        inflight--;
                        stalled++;
                    }
                }
            }
            int to = 20;
            if (interval) {
                int64_t wait = (int64_t)(next_pub - now_ns()) / 1000000;
                if (wait < to) to = wait < 0 ? 0 : (int)wait;
            }
            loop_once(to);
        }
        c1 = self_cpu();
        s1 = proc_cpu(server_pid);
        double wall = marked ? ph_duration : 0;
        if (!marked || publisher->state != ST_READY) status = 1;
        printf("{\"mode\":\"fanout\",\"subs\":%ld,\"window\":%ld,\"rate\":%.2f,\"duration\":%.3f,"
               "\"setup_s\":%.3f,\"drain_left\":%ld,\"delivered\":%ld,\"delivered_per_s\":%.1f,"
               "\"published\":%ld,\"completed\":%ld,\"publishes_per_s\":%.1f,\"acks\":%ld,"
               "\"pub_errors\":%ld,\"stalled\":%ld,\"subs_ready_at_end\":%ld,",
               nconns, window, rate, ph_duration, setup_secs, drained_left, delivered_in_window,
               delivered_in_window / ph_duration, published_in_window, completed_in_window,
               completed_in_window / ph_duration, acks, pub_errors, stalled, ready - 1);
        print_samples("latency_us", &lat);
        printf(",");
        print_common(c1 - c0, (s0 >= 0 && s1 >= 0) ? s1 - s0 : -1, wall);
        printf("}\n");
        fflush(stdout);
        if (status) break;
    }
    for (long i = 0; i < nslots; i++) conn_reset_close(&conns[i]);
    return status;
}
