"""NATS-style patterns and per-connection permissions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apix_trio.auth import permissions
from apix_trio.auth.identity import Identity
from apix_trio.auth.permissions import (
    BadPattern,
    Permissions,
    compile_pattern,
    parse_pattern,
)

MATCHES = [
    ("chat.room42", "chat.room42"),
    ("chat.*", "chat.room42"),
    ("*.room42", "chat.room42"),
    ("*", "chat"),
    ("chat.>", "chat.room42"),
    ("chat.>", "chat.room42.thread.7"),
    (">", "chat"),
    (">", "a.b.c.d.e.f.g.h"),
    ("a.*.c.>", "a.b.c.d"),
    ("user.alice@x:1", "user.alice@x:1"),
    ("a.b.c.d.e.f.g.>", "a.b.c.d.e.f.g.h"),
]

MISSES = [
    ("chat.room42", "chat.room43"),
    ("chat.room42", "chat.room42.x"),
    ("chat.*", "chat"),
    ("chat.*", "chat.a.b"),
    ("chat.>", "chat"),
    ("chat.>", "chats.x"),
    ("*", "a.b"),
    ("chat.room", "Chat.room"),
    ("chat.*", "chat."),
    ("chat.*", "chat..x"),
    (">", ""),
    (">", "a.b.c.d.e.f.g.h.i"),  # nine tokens: not a channel
    (">", "a" * 201),  # too long: not a channel
    ("chat.*", "chat.room 1"),
    ("chat.*", "chat.röom"),
    ("a.b", "a.b\n"),
    ("a.b", "aXb"),  # the dot is literal
]


@pytest.mark.parametrize(("pattern", "name"), MATCHES)
def test_matches(pattern: str, name: str) -> None:
    assert compile_pattern(pattern).matches(name)
    assert Permissions(subscribe=[compile_pattern(pattern)]).can_subscribe(name)


@pytest.mark.parametrize(("pattern", "name"), MISSES)
def test_does_not_match(pattern: str, name: str) -> None:
    assert not compile_pattern(pattern).matches(name)
    assert not Permissions(subscribe=[compile_pattern(pattern)]).can_subscribe(name)


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        ".",
        "a.",
        ".a",
        "a..b",
        "a.>.b",
        ">.a",
        "a.b>",
        "a*",
        "a.**",
        "a b",
        "a.{sub}",  # no {sub} outside perms
        "a.b.c.d.e.f.g.h.i",
        "x" * 201,
        "chat.#",
    ],
)
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(BadPattern):
        compile_pattern(pattern)


def test_sub_placeholder_only_as_a_whole_token() -> None:
    assert parse_pattern("user.{sub}.>", allow_sub=True) == ("user", "{sub}", ">")
    with pytest.raises(BadPattern):
        parse_pattern("user.x{sub}", allow_sub=True)
    with pytest.raises(BadPattern):
        parse_pattern("user.{sub}")


def test_sub_is_bound() -> None:
    mine = compile_pattern("user.{sub}.>", sub="alice")
    assert mine.matches("user.alice.inbox")
    assert not mine.matches("user.bob.inbox")
    assert not mine.matches("user.{sub}.inbox")


@pytest.mark.parametrize("sub", ["alice.admin", "a b", "", "*", ">", "é", "x" * 300])
def test_a_sub_that_is_not_a_token_never_matches(sub: str) -> None:
    pattern = compile_pattern("user.{sub}", sub=sub)
    for name in ["user.alice", "user.admin", "user.x", f"user.{sub}"]:
        assert not pattern.matches(name)


def test_sub_is_literal_not_a_regex() -> None:
    assert not compile_pattern("user.{sub}", sub="a-z").matches("user.b")
    assert compile_pattern("user.{sub}", sub="a-z").matches("user.a-z")


def identity(**kwargs: object) -> Identity:
    base: dict[str, object] = {"org": "acme", "sub": "alice", "exp": 0}
    base.update(kwargs)
    return Identity(**base)  # type: ignore[arg-type]


def test_from_identity() -> None:
    perms = Permissions.from_identity(
        identity(
            perms={
                "sub": ("chat.>", "user.{sub}"),
                "pub": ("chat.*",),
                "state": ("doc.{sub}.*",),
            }
        )
    )
    assert perms.can_subscribe("chat.a.b")
    assert perms.can_subscribe("user.alice")
    assert not perms.can_subscribe("user.bob")
    assert perms.can_publish("chat.a")
    assert not perms.can_publish("chat.a.b")
    assert not perms.can_publish("user.alice")
    assert perms.can_state("doc.alice.title")
    assert not perms.can_state("doc.bob.title")
    assert not perms.can_state("chat.a")
    assert not perms.admin


def test_no_perms_grants_nothing() -> None:
    perms = Permissions.from_identity(identity())
    assert not perms.can_subscribe("chat.a")
    assert not perms.can_publish("chat.a")
    assert not perms.can_state("chat.a")


def test_invalid_patterns_grant_nothing() -> None:
    perms = Permissions.from_identity(identity(perms={"sub": ("a.>.b", ">"), "pub": ("..",)}))
    assert perms.can_subscribe("anything.at.all")  # the valid one still counts
    assert not perms.can_publish("a.b")


def test_admin_grants_everything() -> None:
    perms = Permissions.from_identity(identity(roles=("reader", "admin")))
    assert perms.admin
    assert perms.can_subscribe("x.y") and perms.can_publish("x.y") and perms.can_state("k")


def test_identities_with_the_same_perms_share_one_permissions() -> None:
    plain = {"sub": ("chat.>",), "pub": ("chat.*",)}
    bound = {"sub": ("user.{sub}",)}
    alice, bob = identity(sub="alice", perms=plain), identity(sub="bob", perms=plain)
    assert Permissions.from_identity(alice) is Permissions.from_identity(bob)
    # `{sub}` binds the sub: one Permissions per sub, each right for its own.
    alice_own = Permissions.from_identity(identity(sub="alice", perms=bound))
    bob_own = Permissions.from_identity(identity(sub="bob", perms=bound))
    assert alice_own is not bob_own
    assert alice_own.can_subscribe("user.alice") and not alice_own.can_subscribe("user.bob")
    assert bob_own.can_subscribe("user.bob") and not bob_own.can_subscribe("user.alice")
    # Roles count: admin is not shared with a non-admin of the same perms.
    admin = Permissions.from_identity(identity(sub="carol", perms=plain, roles=("admin",)))
    assert admin.admin and not Permissions.from_identity(alice).admin
    # Bounded: past SHARED_LIMIT distinct perms the table starts again.
    for i in range(permissions.SHARED_LIMIT + 1):
        Permissions.from_identity(identity(perms={"sub": (f"c{i}.>",)}))
    assert len(permissions._SHARED) <= permissions.SHARED_LIMIT


def test_decisions_are_cached_and_stay_correct() -> None:
    perms = Permissions(subscribe=[compile_pattern("chat.*")])
    for round_ in range(3):
        for i in range(200):  # more names than the cache holds
            assert perms.can_subscribe(f"chat.r{i}"), round_
            assert not perms.can_subscribe(f"news.r{i}"), round_


TOKEN = st.text("ab_-:@Z09", min_size=1, max_size=12)
NAMES = st.lists(TOKEN, min_size=1, max_size=8).map(".".join).filter(lambda n: len(n) <= 200)


@given(NAMES)
def test_a_name_matches_itself_and_the_wildcards(name: str) -> None:
    tokens = name.split(".")
    assert compile_pattern(name).matches(name)
    assert compile_pattern(".".join("*" * len(tokens))).matches(name)
    assert compile_pattern(">").matches(name)
    if len(tokens) > 1:
        assert compile_pattern(f"{tokens[0]}.>").matches(name)
    else:
        assert not compile_pattern(f"{tokens[0]}.>").matches(name)


@given(NAMES, NAMES)
def test_literal_patterns_match_only_equal_names(pattern: str, name: str) -> None:
    assert compile_pattern(pattern).matches(name) == (pattern == name)


@given(st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=4), NAMES)
def test_star_patterns_agree_with_a_token_comparison(tokens: list[str], name: str) -> None:
    names = name.split(".")
    expected = len(tokens) == len(names) and all(
        t == "*" or t == n for t, n in zip(tokens, names, strict=False)
    )
    assert compile_pattern(".".join(tokens)).matches(name) == expected


def test_namespace_patterns_read_sub_as_any_user():
    from apix_trio.routing.namespaces import Namespaces
    from apix_trio.settings import ChannelOptions, Namespace, Settings

    private = ChannelOptions(history_size=500)
    namespaces = Namespaces(Settings(namespaces=(Namespace("user.{sub}", private),)))
    assert namespaces.options("user.bob") is private
    assert namespaces.options("user.alice") is private
    assert namespaces.options("user.bob.inbox") is not private
