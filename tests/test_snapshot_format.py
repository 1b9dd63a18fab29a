"""The vars format on its own (bgpool.shm.snapshot over the C codec): what encodes,
what comes back, and that no bytes whatever can crash a reader or give it
anything but the allowed types. Pure: no processes."""

from __future__ import annotations

import enum
import gc
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bgpool
from bgpool.shm import snapshot
from bgpool.shm.snapshot import MAX_DEPTH, SnapshotError, Vars, decode, encode

ALLOWED = (type(None), bool, int, float, str, bytes, tuple, Vars)


def same(got: Any, want: Any) -> bool:
    """`got` is what a reader should get back for `want`: equal, with the same
    types all the way down (so 1 is not True, and a float NaN equals a NaN),
    except that dicts come back as read-only Vars and lists as tuples."""
    if isinstance(want, dict):
        return (
            type(got) is Vars
            and list(got) == list(want)
            and all(same(got[k], want[k]) for k in want)
        )
    if isinstance(want, list | tuple):
        return (
            type(got) is tuple
            and len(got) == len(want)
            and all(same(g, w) for g, w in zip(got, want, strict=True))
        )
    if type(got) is not type(want):
        return False
    if isinstance(got, float) and math.isnan(got):
        return math.isnan(want)
    return bool(got == want)


def only_allowed(value: Any) -> bool:
    """Every value, read all the way down (which builds every mapping), is
    of an allowed type."""
    if isinstance(value, Vars):
        return all(type(k) is str and only_allowed(v) for k, v in value.items())
    if type(value) is tuple:
        return all(only_allowed(v) for v in value)
    return type(value) in ALLOWED


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary()
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.lists(inner, max_size=6).map(tuple)
        | st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=40,
)
snapshots = st.dictionaries(st.text(max_size=8), values, max_size=8)


@settings(max_examples=400, deadline=None)
@given(snapshots)
def test_every_allowed_value_round_trips_deeply_read_only(value: dict[str, Any]) -> None:
    got = decode(encode(value))
    assert same(got, value)
    assert only_allowed(got)


@pytest.mark.parametrize(
    "value",
    [
        0,
        -1,
        2**63 - 1,
        -(2**63),
        2**63,
        -(2**63) - 1,
        10**400,
        -(10**400),
        -0.0,
        math.inf,
        -math.inf,
        5e-324,
        "",
        "a\x00b",
        "\ud800 lone surrogate",
        "héllo ✓ 日本 🐍",
        "x" * 100,
        b"",
        b"\x00\xff" * 50,
        [],
        (),
        {},
    ],
)
def test_edge_values_round_trip(value: Any) -> None:
    got = decode(encode({"v": value}))["v"]
    assert same(got, value)


def test_nan_round_trips() -> None:
    assert math.isnan(decode(encode({"v": math.nan}))["v"])


def test_deep_nesting_up_to_the_limit_round_trips_and_past_it_is_refused() -> None:
    deepest: Any = "bottom"
    for _ in range(MAX_DEPTH - 1):  # the top-level dict is the last level
        deepest = [deepest]
    got: Any = decode(encode({"d": deepest}))["d"]
    for _ in range(MAX_DEPTH - 1):
        assert type(got) is tuple and len(got) == 1
        got = got[0]
    assert got == "bottom"
    with pytest.raises(ValueError, match=f"nested more than {MAX_DEPTH} levels deep"):
        encode({"d": [deepest]})


def test_a_container_inside_itself_is_a_value_error_not_a_crash() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="does a container hold itself"):
        encode({"loop": loop})


def test_equal_values_encode_to_equal_bytes() -> None:
    # Distinct but equal key and value objects, built at run time.
    keys = ["".join(["pa", "th"]), "path"]
    first = {"routes": [{keys[0]: "/a" + str(i)} for i in range(3)], "n": 10**30}
    second = {"routes": [{keys[1]: f"/a{i}"} for i in range(3)], "n": 10**30}
    assert keys[0] is not keys[1]
    assert encode(first) == encode(second)
    assert encode(first) != encode({**first, "n": 10**30 + 1})


def test_the_order_of_a_mappings_items_is_kept_so_it_is_part_of_the_bytes() -> None:
    # Equal dicts, built in another order: a reader gets each order back, so
    # the bytes differ (publishing one after the other makes a new generation).
    first, second = {"a": 1, "b": 2}, {"b": 2, "a": 1}
    assert first == second and encode(first) != encode(second)
    assert list(decode(encode(first))) == ["a", "b"]
    assert list(decode(encode(second))) == ["b", "a"]
    # ...and so do other equal values of other types or signs
    assert encode({"n": 1}) != encode({"n": 1.0}) != encode({"n": True})
    assert encode({"x": 0.0}) != encode({"x": -0.0})


def test_the_format_is_stable() -> None:
    # Every tag, a numbered key used again, lone surrogates: the bytes of
    # format version 1, which readers of other bgpool builds decode.
    value = {
        "none": None, "t": True, "f": False, "i": -5, "big": -(2**70), "d": 1.5, "s": "h\u00e9",
        "b": b"\x00\xff", "l": [1, (2,)], "m": {"none": 1}, "sur": "\udc80",
    }  # fmt: skip
    assert encode(value) == (
        b"\x01m\x0b\x08noneN\x02tT\x02fF\x02ii\t\x06bigI\n\x01\x00\x00\x00\x00\x00\x00"
        b"\x00\x00@\x02dd\x00\x00\x00\x00\x00\x00\xf8?\x02ss\x03h\xc3\xa9\x02bb\x02\x00"
        b"\xff\x02ll\x02i\x02l\x01i\x04\x02mm\x01\x01i\x02\x06surs\x03\xed\xb2\x80"
    )
    large = encode({"x": {f"k{i}": i for i in range(33)}})  # keys written out, not numbered
    assert large.startswith(b"\x01m\x01\x02xm!\x04k0i\x00\x04k1i\x02")


def test_repeated_keys_are_written_once() -> None:
    items = [{"a_long_field_name": i} for i in range(100)]
    data = encode({"items": items})
    assert data.count(b"a_long_field_name") == 1
    assert decode(data)["items"][99]["a_long_field_name"] == 99


def test_keys_of_large_mappings_are_written_out_and_mix_with_numbered_ones() -> None:
    # Large mappings (over 32 items) do not number their keys; small ones do.
    # Both kinds share key texts here, in every order, and must still agree.
    big = {f"field{i}": i for i in range(100)}
    value = {
        "before": [{"field1": "a", "field2": "b"}] * 3,
        "big": big,
        "after": [{"field2": "c", "field99": "d"}] * 3,
        "bigger": {**big, "extra": [{"field1": 0}]},
    }
    data = encode(value)
    assert same(decode(data), value)
    assert data.count(b"field50") == 2  # once in each large mapping
    assert data.count(b"field99") == 3  # and once for all the small ones


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": [1, {"b": (2, object())}]}, "vars['a'][1]['b'][1]: values of type object are not"),
        ({"a": {"b": {3: "x"}}}, "vars['a']['b']: keys must be str, not int (3)"),
        ({"c": Color.RED}, "vars['c']: values of type Color are not allowed"),
        ({"t": Text("x")}, "vars['t']: values of type Text are not allowed"),
        ({"k": {Text("x"): 1}}, "vars['k']: keys must be str, not Text ('x')"),
        ({"o": OrderedDict()}, "vars['o']: values of type OrderedDict are not allowed"),
        ({"b": bytearray(b"x")}, "vars['b']: values of type bytearray are not allowed"),
        ({"m": memoryview(b"x")}, "vars['m']: values of type memoryview are not allowed"),
        ({"s": frozenset()}, "vars['s']: values of type frozenset are not allowed"),
        ({"z": 1j}, "vars['z']: values of type complex are not allowed"),
        ({"e": ...}, "vars['e']: values of type ellipsis are not allowed"),
        ({"f": len}, "vars['f']: values of type builtin_function_or_method are not"),
        ({"\n": [[], [object()]]}, "vars['\\n'][1][0]: values of type object"),
    ],
)
def test_disallowed_values_name_their_path(value: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError) as caught:
        encode(value)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("top", [[1], (1,), "x", None, OrderedDict(a=1), MappingProxyType({})])
def test_the_top_level_must_be_a_dict(top: Any) -> None:
    with pytest.raises(TypeError, match="vars must be a dict with str keys, not"):
        encode(top)


# -- the read-only mapping a reader gets --------------------------------------------


def test_a_snapshot_reads_as_a_read_only_mapping() -> None:
    got = decode(encode(SAMPLE))
    assert type(got) is bgpool.Vars and isinstance(got, Mapping) and not isinstance(got, dict)
    assert len(got) == len(SAMPLE) and list(got) == list(SAMPLE)
    assert "seq" in got and "nope" not in got
    assert got.get("seq") == 7 and got.get("nope") is None and got.get("nope", 3) == 3
    assert list(got.keys()) == list(SAMPLE) and list(reversed(got)) == list(reversed(SAMPLE))
    assert dict(got.items())["x"] == 1.5 and -(2**100) in got.values()
    with pytest.raises(KeyError, match="nope"):
        got["nope"]
    with pytest.raises(TypeError):
        got["x"] = 2  # type: ignore[index]
    with pytest.raises(TypeError):
        del got["x"]  # type: ignore[attr-defined]
    for method in ("update", "pop", "popitem", "setdefault", "clear"):
        assert not hasattr(got, method)
    with pytest.raises(TypeError, match="unhashable"):
        hash(got)
    with pytest.raises(TypeError):
        type(got)()
    copy = got.copy()
    copy["x"] = 2
    assert type(copy) is dict and copy["flags"] is got["flags"] and got["x"] == 1.5
    merged, merged_back = got | {"x": 2}, {"x": 2, "new": 1} | got
    assert type(merged) is dict and merged["x"] == 2 and merged["seq"] == 7
    assert type(merged_back) is dict and merged_back["x"] == 1.5 and merged_back["new"] == 1
    assert got["flags"] | got["flags"] == dict(got["flags"])
    match got:
        case {"seq": 7, "flags": {"on": True}}:
            pass
        case _:
            pytest.fail("a Vars must match a mapping pattern")


def test_equality_follows_the_values() -> None:
    got, again = decode(encode(SAMPLE)), decode(encode(SAMPLE))
    assert got == again and got is not again and (got != again) is False
    assert got["flags"] == {"on": True, "off": False, "none": None}
    assert got["flags"] == MappingProxyType({"on": True, "off": False, "none": None})
    assert got["routes"][0] == {"path": "/a", "tags": ("x", "é")}
    assert got["flags"] != {"on": True} and got != decode(encode({**SAMPLE, "seq": 8}))


def test_repr_shows_the_values() -> None:
    assert repr(decode(encode({"a": {"b": [1]}}))) == "Vars({'a': Vars({'b': (1,)})})"


def test_a_mapping_is_built_once_and_a_repeated_key_is_one_object() -> None:
    got = decode(encode({"routes": [{"path": "/a"}, {"path": "/b"}], "f": {"x": 1}}))
    assert got["f"] is got["f"]
    first, second = got["routes"]
    assert next(iter(first)) is next(iter(second))


def test_a_nested_mapping_outlives_the_snapshot_that_held_it() -> None:
    inner = decode(encode({"a": {"b": {"c": "deep"}}}))["a"]
    gc.collect()
    assert inner["b"]["c"] == "deep"


def test_every_check_is_made_before_anything_is_read() -> None:
    # Bad UTF-8 deep inside a mapping nobody reads: decode() itself refuses it.
    data = bytearray(encode({"a": 1, "deep": {"x": {"y": "zz"}}}))
    data[data.rindex(b"zz")] = 0xFF
    with pytest.raises(SnapshotError, match="invalid UTF-8"):
        decode(bytes(data))


def test_threads_reading_a_mapping_for_the_first_time_get_one_object() -> None:
    got = decode(encode({"m": {f"k{i}": [i] for i in range(50)}}))
    barrier = threading.Barrier(4)
    results: list[Any] = []

    def read() -> None:
        barrier.wait()
        results.append(got["m"])

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 4 and all(r is results[0] for r in results)


def test_any_bytes_like_object_decodes() -> None:
    data = encode(SAMPLE)
    assert decode(bytearray(data)) == decode(memoryview(data)) == decode(data)


# -- reading bytes no worker of ours wrote ------------------------------------------

SAMPLE = {
    "seq": 7,
    "big": -(2**100),
    "x": 1.5,
    "flags": {"on": True, "off": False, "none": None},
    "routes": [{"path": "/a", "tags": ["x", "é"]}, {"path": "/b", "tags": []}],
    "raw": b"\x00\x01",
    "\udcff key": "\ud800",
}


def test_every_truncation_of_a_snapshot_is_refused() -> None:
    data = encode(SAMPLE)
    for end in range(len(data)):
        with pytest.raises(SnapshotError):
            decode(data[:end])


def test_random_corruption_never_crashes_and_never_gives_other_types() -> None:
    data = bytearray(encode(SAMPLE))
    rng = random.Random(2393)
    decoded = refused = 0
    for _ in range(20_000):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            value = decode(bytes(damaged))
        except SnapshotError:
            refused += 1
        else:
            decoded += 1
            assert only_allowed(value)
    assert refused > 0 and decoded > 0  # both outcomes were exercised


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_to_allowed_values_or_are_refused(data: bytes) -> None:
    for candidate in (data, b"\x01m" + data):
        try:
            value = decode(candidate)
        except SnapshotError:
            continue
        assert isinstance(value, Vars) and only_allowed(value)


# The start of a mapping of 33 items (too many for numbered keys), 32 of them
# written out: "k0" to "k31", each None.
LARGE = b"\x01m\x21" + b"".join(
    bytes([2 * len(k)]) + k.encode() + b"N" for k in (f"k{i}" for i in range(32))
)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "unknown format"),
        (b"\x02m\x00", "unknown format"),
        (b"\x01l\x00", "not a mapping"),
        (b"\x01m\x00\x00", "trailing bytes"),
        (b"\x01m\xff\xff\xff\xff\xff\xff\xff\xff\x7f", "a length runs past the end"),
        (b"\x01m" + b"\xff" * 11, "varint too long"),
        (b"\x01m\x01\x03N", "a key number that came before no key"),
        (b"\x01m\x02\x02aN\x01N", "duplicate key"),
        (b"\x01m\x02\x02aN\x02aN", "a key written out twice"),
        (b"\x01m\x01\x02am\x01\x02aN", "a key written out twice"),
        (LARGE + b"\x04k0N", "duplicate key"),
        (LARGE + b"\x01N", "a key number in a mapping of more than 32 items"),
        (b"\x01m\x01\x02\xffN", "invalid UTF-8"),
        (b"\x01m\x01\x02aX", "unknown tag"),
        (b"\x01m\x01\x02ad\x00", "cut short"),
        (b"\x01m\x01\x02aI\x02\x05\x01", "bad big int"),
        (b"\x01m\x01\x02a" + b"l\x01" * (MAX_DEPTH + 5) + b"N", "nested too deeply"),
    ],
)
def test_malformed_bytes_say_what_is_wrong(data: bytes, why: str) -> None:
    with pytest.raises(SnapshotError, match=why):
        decode(data)


def _utf8_verdicts(texts: Any) -> list[tuple[bytes, bool, bool]]:
    """(text, accepted as a str value by decode(), decodes with surrogatepass)."""
    verdicts = []
    for text in texts:
        try:
            decode(b"\x01m\x01\x02as" + bytes([len(text)]) + text)["a"]
            accepted = True
        except SnapshotError:
            accepted = False
        try:
            text.decode("utf-8", "surrogatepass")
            valid = True
        except UnicodeDecodeError:
            valid = False
        verdicts.append((text, accepted, valid))
    return verdicts


def test_the_utf8_check_agrees_with_python_on_every_short_sequence() -> None:
    # Every 1- and 2-byte text, and every 3- and 4-byte start of a multi-byte
    # sequence: overlongs, surrogates (passed through), past U+10FFFF, cut short.
    texts = [bytes([a]) for a in range(256)]
    texts += [bytes([a, b]) for a in range(256) for b in range(256)]
    texts += [
        bytes([a, b, c]) for a in range(0xE0, 0xF8) for b in range(256) for c in (0x80, 0xBF, 0x41)
    ]
    texts += [bytes([a, b, 0x80, 0x80]) for a in range(0xF0, 0xF8) for b in range(256)]
    texts += [b"x" * k + t for t in (b"\xe2\x9c\x93", b"\xff", b"\xed\xa0\x80") for k in range(40)]
    wrong = [(t, accepted) for t, accepted, valid in _utf8_verdicts(texts) if accepted != valid]
    assert not wrong, wrong[:5]


def test_a_claimed_huge_container_allocates_nothing_before_its_items_exist() -> None:
    # 2**42 items claimed, 3 bytes present: refused at once, before any tuple exists.
    with pytest.raises(SnapshotError, match="runs past the end"):
        decode(b"\x01m\x01\x02al\x80\x80\x80\x80\x80\x80\x01NNN")


def test_the_module_reexports_its_limit() -> None:
    assert snapshot.MAX_DEPTH == MAX_DEPTH == 2000
