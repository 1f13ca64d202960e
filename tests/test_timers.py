"""Connection timers on a MockClock, with exact virtual times."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.memws import fake_wall, memory_hub


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_no_auth_closes_4001_at_auth_timeout(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, auth={"timeout": 5.0}) as mem:
        start = trio.current_time()
        client = await mem.connect()
        await client.until_closed()
        assert client.close_code == 4001
        assert client.close_time == pytest.approx(start + 5.0)


async def test_auth_in_time_cancels_the_auth_timer(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, auth={"timeout": 5.0}, heartbeat={"interval": 1000}) as mem:
        client = await mem.connect()
        assert (await client.call("auth", token=mem.token()))["ok"]
        await trio.sleep(60)
        assert (await client.call("ping"))["ok"]
        assert client.close_code is None


async def test_heartbeat_schedule_and_4008_without_pong(tmp_path, autojump_clock):
    async with memory_hub(tmp_path, heartbeat={"interval": 20.0, "timeout": 7.0}) as mem:
        start = trio.current_time()
        client = await mem.connect()
        assert (await client.call("auth", token=mem.token(ttl=100_000)))["ok"]
        # Three answered pings: the first jittered in [interval/2, interval],
        # then exactly one interval apart.
        assert await client.recv(until=lambda: len(client.pings) >= 3) is None
        assert client.close_code is None
        first = client.pings[0] - start
        assert 10.0 <= first <= 20.0
        assert client.pings[1] - client.pings[0] == pytest.approx(20.0)
        assert client.pings[2] - client.pings[1] == pytest.approx(20.0)
        # Stop answering: the next ping goes unanswered -> 4008 after timeout.
        client.answer_pings = False
        await client.until_closed()
        assert client.close_code == 4008
        assert client.close_time == pytest.approx(client.pings[3] + 7.0)


async def test_token_expiring_push_then_4003_at_exp_plus_leeway(tmp_path, autojump_clock):
    async with memory_hub(
        tmp_path,
        auth={"expiry_warning": 30.0, "leeway": 5.0},
        heartbeat={"interval": 1e6},
    ) as mem:
        client = await mem.connect()
        token = mem.token(ttl=100)
        result = (await client.call("auth", token=token))["result"]
        exp = result["exp"]
        push = await client.recv()
        assert push == {"push": "token_expiring", "exp": exp}
        assert fake_wall() == pytest.approx(exp - 30.0)
        await client.until_closed()
        assert client.close_code == 4003
        assert client.close_time is not None
        assert fake_wall() == pytest.approx(exp + 5.0, abs=0.01)


async def test_refresh_moves_both_timers(tmp_path, autojump_clock):
    async with memory_hub(
        tmp_path,
        auth={"expiry_warning": 30.0, "leeway": 0.0},
        heartbeat={"interval": 1e6},
    ) as mem:
        client = await mem.connect()
        assert (await client.call("auth", token=mem.token(ttl=100)))["ok"]
        await trio.sleep(50)
        reply = await client.call("refresh", token=mem.token(ttl=200))
        new_exp = reply["result"]["exp"]
        push = await client.recv()
        assert push == {"push": "token_expiring", "exp": new_exp}
        assert fake_wall() == pytest.approx(new_exp - 30.0)
        await client.until_closed()
        assert client.close_code == 4003
        assert fake_wall() == pytest.approx(new_exp, abs=0.01)


async def test_sustained_rate_limit_abuse_closes_4029(tmp_path, autojump_clock):
    async with memory_hub(
        tmp_path, limits={"ops_per_second": 1.0}, heartbeat={"interval": 1e6}
    ) as mem:
        client = await mem.connect()
        assert (await client.call("auth", token=mem.token(ttl=100_000)))["ok"]
        first_limited = None
        last_reply = None
        # 20 ops per virtual second against a rate of 1/s (burst 2).
        for n in range(1, 1000):
            await client.send({"op": "ping", "id": n})
            frame = await client.recv()
            if frame is None:
                break
            last_reply = trio.current_time()
            if not frame["ok"]:
                assert frame["error"]["code"] == "rate_limited"
                assert 0 < frame["error"]["retry_after"] <= 1.0
                if first_limited is None:
                    first_limited = trio.current_time()
            await trio.sleep(0.05)
        assert client.close_code == 4029
        assert first_limited is not None and last_reply is not None
        # The limit held for 10 s of rate_limited replies, then the close.
        assert client.close_time == pytest.approx(first_limited + 10.0, abs=0.06)
