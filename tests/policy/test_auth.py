"""Authentication: htpasswd files, Basic credentials, the verify cache, SOCKS4 user ids."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from passlib.hash import (  # type: ignore[import-untyped]
    apr_md5_crypt,
    md5_crypt,
    sha256_crypt,
    sha512_crypt,
)

from proxytap.config import _build
from proxytap.errors import ConfigError, ProtocolError
from proxytap.policy import auth
from proxytap.policy.auth import (
    AuthCache,
    AuthConfig,
    Htpasswd,
    basic_credentials,
    check_password,
    hash_scheme,
    parse_proxy_authorization,
    proxy_authenticate_header,
    socks4_userid_ok,
)


def bcrypt_hash(password: str, prefix: bytes = b"2b", cost: int = 4) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost, prefix=prefix)).decode()


# Published vectors: the SHA-crypt specification (Drepper) and OpenBSD's bcrypt tests.
KNOWN = [
    ("$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5", "Hello world!"),
    (
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcb"
        "YEdFCoEOfaS35inz1",
        "Hello world!",
    ),
    (
        "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
        "Hello world!",
    ),
    ("$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW", "U*U"),
    ("$2a$05$CCCCCCCCCCCCCCCCCCCCC.VGOzA784oUp/Z0DY336zx7pLYAy0lwK", "U*U*"),
]


@pytest.mark.parametrize(("stored", "password"), KNOWN)
def test_published_vectors(stored: str, password: str) -> None:
    assert check_password(stored, password)
    assert not check_password(stored, password + "x")


@pytest.fixture(scope="module")
def entries() -> dict[str, tuple[str, str]]:
    """user -> (hash, password), every scheme, made by the libraries."""
    return {
        "alice": (bcrypt_hash("alice-pw"), "alice-pw"),
        "bob": (bcrypt_hash("bob-pw", b"2a"), "bob-pw"),
        "carol": (bcrypt_hash("carol-pw").replace("$2b$", "$2y$"), "carol-pw"),  # htpasswd -B
        "dave": (sha512_crypt.using(rounds=1000).hash("dave-pw"), "dave-pw"),
        "erin": (sha256_crypt.using(rounds=1000).hash("erin-pw"), "erin-pw"),
        "frank": (apr_md5_crypt.hash("frank-pw"), "frank-pw"),
        "grace": (md5_crypt.hash("grace-pw"), "grace-pw"),
        "héloïse": (bcrypt_hash("pässwörd ünïcode"), "pässwörd ünïcode"),
        "long": (bcrypt_hash("L" * 72), "L" * 80),  # bcrypt reads 72 bytes
        "colon": (sha512_crypt.using(rounds=1000).hash("a:b:c"), "a:b:c"),
    }


@pytest.fixture(scope="module")
def htfile(tmp_path_factory: pytest.TempPathFactory, entries: dict[str, tuple[str, str]]) -> Path:
    lines = ["# proxytap users", "", "   "]
    lines += [f"{u}:{h}" for u, (h, _pw) in entries.items()]
    path = tmp_path_factory.mktemp("auth") / "htpasswd"
    path.write_bytes(("\r\n".join(lines) + "\n").encode())
    return path


def test_load_and_verify(htfile: Path, entries: dict[str, tuple[str, str]]) -> None:
    users = Htpasswd.load(htfile)
    assert users.users == set(entries)
    assert len(users) == len(entries)
    assert "alice" in users and "mallory" not in users
    assert users.weak_users == {"frank", "grace"}
    for user, (_h, pw) in entries.items():
        assert users.verify(user, pw), user
        assert not users.verify(user, "#" + pw[1:]), user
        assert not users.verify(user, ""), user
    assert not users.verify("alice", "bob-pw")
    assert not users.verify("mallory", "alice-pw")
    assert not users.verify("", "")
    assert users.verify("long", "L" * 72 + "anything")  # as Apache's bcrypt: 72 bytes count


def test_scheme_table(entries: dict[str, tuple[str, str]]) -> None:
    schemes = {u: hash_scheme(h) for u, (h, _pw) in entries.items()}
    assert schemes == {
        "alice": "bcrypt",
        "bob": "bcrypt",
        "carol": "bcrypt",
        "dave": "sha512-crypt",
        "erin": "sha256-crypt",
        "frank": "apr1",
        "grace": "md5-crypt",
        "héloïse": "bcrypt",
        "long": "bcrypt",
        "colon": "sha512-crypt",
    }
    assert hash_scheme("{SHA}x") is None


def test_latin1_client_matches_utf8_hash(entries: dict[str, tuple[str, str]]) -> None:
    users = Htpasswd({"u": bcrypt_hash("café")})
    value = "Basic " + base64.b64encode("u:café".encode("latin-1")).decode()
    user, password = parse_proxy_authorization(value)
    assert (user, password) == ("u", "café")
    assert users.verify(user, password)


def test_nul_and_surrogates_never_raise() -> None:
    users = Htpasswd({"s": sha512_crypt.using(rounds=1000).hash("x"), "b": bcrypt_hash("x")})
    assert not users.verify("s", "x\0")
    assert not users.verify("b", "x\0")
    assert not users.verify("s", "\udcff")
    assert not users.verify("b", "\ud800")


def test_unknown_user_runs_one_hash_check(monkeypatch: pytest.MonkeyPatch) -> None:
    cheap = sha512_crypt.using(rounds=1000).hash("x")
    users = Htpasswd(
        {
            "a": bcrypt_hash("a", cost=5),
            "b": bcrypt_hash("b", cost=4),
            "c": bcrypt_hash("c"),
            "d": cheap,
        }
    )
    calls: list[str] = []
    real = auth.check_password

    def spy(stored: str, password: str) -> bool:
        calls.append(stored)
        return real(stored, password)

    monkeypatch.setattr(auth, "check_password", spy)
    assert not users.verify("nobody", "b")
    assert len(calls) == 1
    assert calls[0].startswith("$2b$04$")  # the most common scheme and cost in the file
    calls.clear()
    assert users.verify("d", "x") and calls == [cheap]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no users"),
        ("# only a comment\n\n", "no users"),
        ("alice:{SHA}qvTGHdzF6KLavt4PO0gs2a6pQ00=", "line 1: unsalted"),
        ("alice:abJnggxhB/yWI", "DES"),
        ("alice:secret", "unsupported"),
        ("\nalice:$2b$04$short", "line 2: malformed bcrypt"),
        ("alice:$2x$04$" + "a" * 53, "unsupported"),
        ("alice:$2b$99$" + "a" * 53, "malformed bcrypt"),
        ("alice:$6$salt$short", "malformed"),
        ("alice:$6$rounds=10$salt$" + "a" * 86, "rounds"),
        ("alice:$apr1$x", "malformed"),
        ("nocolon", "expected user:hash"),
        ("alice:", "expected user:hash"),
        (":$2b$04$" + "a" * 53, "bad user name"),
        ("al\x01ice:$2b$04$" + "a" * 53, "bad user name"),
        (
            "alice:$2b$04$" + "a" * 53 + "\nbob:$2b$04$" + "a" * 53 + "\nalice:$2b$04$" + "b" * 53,
            "line 3: user 'alice' appears twice",
        ),
    ],
)
def test_parse_errors(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        Htpasswd.parse(text, source="users.txt")
    assert exc.value.key == "auth.htpasswd"
    assert problem in exc.value.problem


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Htpasswd.load(tmp_path / "missing")
    bad = tmp_path / "latin1"
    bad.write_bytes(b"caf\xe9:" + bcrypt_hash("x").encode())
    with pytest.raises(ConfigError, match="not UTF-8"):
        Htpasswd.load(bad)
    with pytest.raises(ConfigError) as exc:
        Htpasswd.load(tmp_path / "missing", key="listeners[0].auth.htpasswd")
    assert exc.value.key == "listeners[0].auth.htpasswd"


@pytest.mark.skipif(shutil.which("htpasswd") is None, reason="apache2-utils not installed")
def test_apache_htpasswd_tool(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    lines = []
    for flag, user in (("-B", "b"), ("-m", "m"), ("-5", "s5"), ("-2", "s2")):
        cmd = ["htpasswd", "-nb", flag, user, f"{user}-pw"]
        if flag == "-B":
            cmd.insert(2, "-C4")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:  # -2/-5 need Apache 2.4.58+
            lines.append(proc.stdout.strip())
    path.write_text("\n".join(lines) + "\n")
    users = Htpasswd.load(path)
    assert len(users) >= 2
    for user in users.users:
        assert users.verify(user, f"{user}-pw")
        assert not users.verify(user, "nope")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize("flag", ["-5", "-6", "-apr1", "-1"])
def test_openssl_passwd_hashes(flag: str) -> None:
    """An independent implementation made the hash: checks libpass against OpenSSL."""
    out = subprocess.run(
        ["openssl", "passwd", flag, "-salt", "SaltSalt", "pw: ünï"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    users = Htpasswd.parse(f"o:{out}\n")
    assert users.verify("o", "pw: ünï")
    assert not users.verify("o", "pw: uni")


# -- Basic credentials ---------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("value", "user", "password"),
    [
        ("Basic " + b64(b"user:pass"), "user", "pass"),
        ("basic " + b64(b"user:pass"), "user", "pass"),
        ("BASIC   " + b64(b"user:pass") + "  ", "user", "pass"),
        ("\tBasic " + b64(b"user:pass"), "user", "pass"),
        ("Basic " + b64(b"user:a:b:c"), "user", "a:b:c"),
        ("Basic " + b64(b"user:"), "user", ""),
        ("Basic " + b64(b":pass"), "", "pass"),
        ("Basic " + b64("jürgen:pässword".encode()), "jürgen", "pässword"),
        ("Basic " + b64("jürgen:pässword".encode("latin-1")), "jürgen", "pässword"),
        ("Basic " + b64(b"user:pass1").rstrip("="), "user", "pass1"),  # padding left out
        ("Basic " + b64(b"u:p w"), "u", "p w"),
    ],
)
def test_parse_basic(value: str, user: str, password: str) -> None:
    assert parse_proxy_authorization(value) == (user, password)


@pytest.mark.parametrize(
    ("value", "status"),
    [
        ("", 407),
        ("Bearer abc", 407),
        ("Digest username=x", 407),
        ("BasicdXNlcjpwYXNz", 407),
        ("Basic", 400),
        ("Basic ", 400),
        ("Basic !!!!", 400),
        ("Basic " + b64(b"user:pass") + " extra", 400),
        ("Basic " + b64(b"userpass"), 400),
        ("Basic " + b64(b"user:pa\x00ss"), 400),
        ("Basic " + b64(b"us\ter:pass"), 400),
        ("Basic " + b64(b"user:pass\x7f"), 400),
        ("Basic " + "A" * 5000, 400),
        ("Basic a", 400),  # one base64 character is not a whole byte
        ("Basic =abc", 400),
    ],
)
def test_parse_basic_errors(value: str, status: int) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_proxy_authorization(value)
    assert exc.value.status == status
    expected = "http_request_denied" if status == 407 else "http_request_error"
    assert exc.value.proxy_status == expected


_user = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters=":"))
_password = st.text(st.characters(blacklist_categories=("Cc", "Cs")))


@given(_user, _password)
def test_basic_round_trip(user: str, password: str) -> None:
    assert parse_proxy_authorization(basic_credentials(user, password)) == (user, password)


@settings(max_examples=300)
@given(st.text(max_size=60) | st.binary(max_size=60).map(lambda b: "Basic " + b64(b)))
def test_any_header_parses_or_protocol_error(value: str) -> None:
    try:
        user, password = parse_proxy_authorization(value)
    except ProtocolError as exc:
        assert exc.status in (400, 407)
    else:
        assert isinstance(user, str) and isinstance(password, str)


@pytest.mark.parametrize(
    ("realm", "value"),
    [
        ("proxytap", 'Basic realm="proxytap", charset="UTF-8"'),
        ('say "hi"', 'Basic realm="say \\"hi\\"", charset="UTF-8"'),
        ("back\\slash", 'Basic realm="back\\\\slash", charset="UTF-8"'),
    ],
)
def test_proxy_authenticate_header(realm: str, value: str) -> None:
    assert proxy_authenticate_header(realm) == ("Proxy-Authenticate", value)


# -- SOCKS4 user ids -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("userid", "allowed", "ok"),
    [
        (b"", None, True),
        (b"anything", None, True),
        (b"alice", {"alice", "bob"}, True),
        (b"bob", ["alice", "bob"], True),
        (b"carol", {"alice"}, False),
        (b"", {"alice"}, False),
        (b"ALICE", {"alice"}, False),
        ("jürgen".encode(), {"jürgen"}, True),
        (b"\xff\xfe", {"\xff\xfe"}, False),
        (b"alice", set(), False),
    ],
)
def test_socks4_userid(userid: bytes, allowed: set[str] | None, ok: bool) -> None:
    assert socks4_userid_ok(userid, allowed) is ok


# -- cache -------------------------------------------------------------------------------


def test_cache_hits_and_expiry() -> None:
    cache = AuthCache(ttl=10.0, max_entries=4)
    assert not cache.get("alice", "pw", 0.0)
    cache.put("alice", "pw", 100.0)
    assert cache.get("alice", "pw", 100.0)
    assert cache.get("alice", "pw", 109.99)
    assert not cache.get("alice", "PW", 105.0)
    assert not cache.get("bob", "pw", 105.0)
    assert not cache.get("alice", "pw", 110.0)  # expired, and dropped
    assert len(cache) == 0


def test_cache_is_a_bounded_lru() -> None:
    cache = AuthCache(ttl=100.0, max_entries=3)
    for i, user in enumerate("abc"):
        cache.put(user, f"{user}-pw", float(i))
    assert cache.get("a", "a-pw", 5.0)  # a is now most recent
    cache.put("d", "d-pw", 6.0)  # evicts b, the least recent
    assert len(cache) == 3
    assert not cache.get("b", "b-pw", 7.0)
    assert (
        cache.get("a", "a-pw", 7.0) and cache.get("c", "c-pw", 7.0) and cache.get("d", "d-pw", 7.0)
    )
    cache.put("a", "new-pw", 8.0)  # a new password replaces the old one
    assert not cache.get("a", "a-pw", 9.0) and cache.get("a", "new-pw", 9.0)
    cache.clear()
    assert len(cache) == 0


def test_cache_disabled_and_keyed() -> None:
    off = AuthCache(ttl=0.0)
    off.put("a", "pw", 0.0)
    assert not off.get("a", "pw", 0.0) and len(off) == 0
    one, two = AuthCache(key=b"k" * 32), AuthCache(key=b"k" * 32)
    assert one._digest("a", "pw") == two._digest("a", "pw")
    assert AuthCache()._digest("a", "pw") != AuthCache()._digest("a", "pw")  # random keys
    assert one._digest("a:b", "c") != one._digest("a", "b:c")


# -- config ------------------------------------------------------------------------------


def test_auth_config_defaults(htfile: Path) -> None:
    cfg = AuthConfig()
    assert (cfg.htpasswd, cfg.realm, cfg.socks4_userids, cfg.cache_ttl, cfg.cache_size) == (
        None,
        "proxytap",
        None,
        300.0,
        1024,
    )
    cfg.validate("auth")
    assert not cfg.enabled and cfg.load_htpasswd() is None
    on = AuthConfig(htpasswd=str(htfile))
    on.validate("auth")
    users = on.load_htpasswd()
    assert on.enabled and users is not None and "alice" in users
    assert on.cache().ttl == 300.0


def test_auth_config_from_toml_shape(htfile: Path) -> None:
    data: dict[str, Any] = {
        "htpasswd": str(htfile),
        "realm": "corp proxy",
        "socks4_userids": ["alice", "bob"],
        "cache_ttl": 60,
        "cache_size": 16,
    }
    cfg = _build(AuthConfig, data, "auth")
    cfg.validate("auth")
    assert cfg.socks4_userids == ("alice", "bob") and cfg.cache_ttl == 60.0
    with pytest.raises(ConfigError) as exc:
        _build(AuthConfig, {"realm": 5}, "auth")
    assert exc.value.key == "auth.realm"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"htpasswd": " "}, "auth.htpasswd"),
        ({"realm": ""}, "auth.realm"),
        ({"realm": "a\nb"}, "auth.realm"),
        ({"realm": "réalm"}, "auth.realm"),
        ({"socks4_userids": ("ok", "")}, "auth.socks4_userids[1]"),
        ({"socks4_userids": ("a\0b",)}, "auth.socks4_userids[0]"),
        ({"socks4_userids": ("x" * 256,)}, "auth.socks4_userids[0]"),
        ({"cache_ttl": -1.0}, "auth.cache_ttl"),
        ({"cache_size": 0}, "auth.cache_size"),
    ],
)
def test_auth_config_errors(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        AuthConfig(**kwargs).validate("auth")
    assert exc.value.key == key


def test_auth_config_missing_file(tmp_path: Path) -> None:
    cfg = AuthConfig(htpasswd=str(tmp_path / "nope"))
    cfg.validate("auth")  # validate is pure; reading happens in load_htpasswd
    with pytest.raises(ConfigError) as exc:
        cfg.load_htpasswd()
    assert exc.value.key == "auth.htpasswd"
