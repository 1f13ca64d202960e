// Tokens and the WebSocket address for the demo and the dashboard.
//
// `POST /dev/token` exists only while the server runs on its development key
// pair (no auth.public_keys): it signs a short-lived token for a demo user of
// org "demo". Anywhere else it answers 404 and the pages ask for a token to
// be pasted instead.

/** A minted token `{token, org, sub, name, roles, exp, ws_path, ws_port?}`, or null on 404. */
export async function fetchDevToken({ sub, name, role } = {}) {
  const body = {};
  if (sub) body.sub = sub;
  if (name) body.name = name;
  if (role) body.role = role;
  const response = await fetch("/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
    cache: "no-store",
  });
  if (response.status === 404) return null;
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const payload = await response.json();
      if (payload && payload.error) message += `: ${typeof payload.error === "string" ? payload.error : payload.error.message}`;
    } catch {
      /* not JSON */
    }
    throw new Error(`the development token endpoint failed (${message})`);
  }
  return response.json();
}

/**
 * The WebSocket URL: `?ws=` in the page address wins; else this page's host
 * name with the port and path the token endpoint reported (default 8080, /ws).
 */
export function websocketUrl(minted) {
  const explicit = new URLSearchParams(location.search).get("ws");
  if (explicit) return explicit;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const port = (minted && minted.ws_port) || 8080;
  const path = (minted && minted.ws_path) || "/ws";
  const host = location.hostname.includes(":") ? `[${location.hostname}]` : location.hostname;
  return `${scheme}://${host}:${port}${path}`;
}

/** The claims of a JWT (unverified: for display only). */
export function tokenClaims(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload));
  } catch {
    return null;
  }
}
