#!/usr/bin/env python3
"""Writes tests/corpus/hand.jsonl: the hand-written bad-input cases (realistic ways a record goes
wrong), in the format generate.py documents. Kept as a script so that the JSON escaping of the
payloads is right; edit the list below and run it from the repo root."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = {"server_id": 11, "gtid": None, "file": "mariadb-bin.000002", "pos": 4, "row": 0, "ts_ms": 1795660100000, "snapshot": False}
cases = []


def ev(table, key, u, after, refs, op="c", before=None, **over):
    e = {"op": op, "site": "site-a", "table": table, "key": key, "uuid": u, "before": before, "after": after, "refs": refs, "source": dict(SRC), "ts_ms": 1795660100000}
    e.update(over)
    return e


def add(cid, topic, expect, payload, reason=(), category="hand", uuid_=None):
    c = {"id": f"hand-{cid}", "topic": topic, "expect": expect, "category": category, "payload": payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))}
    if reason:
        c["reason"] = list(reason)
    if uuid_:
        c["uuid"] = uuid_
    cases.append(c)


def u(i):
    return f"4a4d0000-0000-4000-8000-{i:012d}"


def person(i, **over):
    row = {"person_id": 50000 + i, "gender": "F", "birthdate": "1990-04-01", "dead": 0, "creator": 1, "date_created": "2026-11-20 10:00:00", "voided": 0, "uuid": u(i)}
    row.update(over)
    return ev("person", {"person_id": 50000 + i}, u(i), row, {"creator": "{USER}"})


def loc(i, **over):
    row = {"location_id": 60000 + i, "name": f"Hand clinic {i}", "creator": 1, "date_created": "2026-11-20 10:00:00", "retired": 0, "uuid": u(i)}
    row.update(over)
    return ev("location", {"location_id": 60000 + i}, u(i), row, {"creator": "{USER}"})


def both(cid, expect, e, reason=(), category="hand", uuid_=None):
    add(cid + "-cdc", "cdc", expect, e, reason, category, uuid_)
    add(cid + "-hq", "hq", expect, {"type": "change", "late": False, "event": json.loads(json.dumps(e).replace(u(0), u(0)))}, reason, category, uuid_)


# Enormous rows: 7 MB in a TEXT column (65,535 bytes at HQ). The topics take 8 MB records.
big = loc(1, description="{BIG_TEXT}")
both("enormous-text", "dlq", big, ["description", "too long"], "enormous row")
# Over what omrs.hq.changes can take once the transform has wrapped it: dead-lettered there.
add("too-large-for-hq", "cdc", "dlq", loc(28, description="{HUGE_TEXT}"), ["record too large"], "enormous row")
# Zero and impossible dates.
# A zero date is legacy MySQL data, not an error: HQ keeps it, the lake reads it as null.
both("zero-datetime", "applied", loc(2, date_created="0000-00-00 00:00:00"), category="zero date", uuid_=u(2))
both("birthdate-month-13", "dlq", person(3, birthdate="1990-13-01"), ["birthdate"], "date out of range")
both("birthdate-words", "dlq", person(4, birthdate="yesterday"), ["birthdate"], "wrong column type")
# Strings over their column.
both("gender-too-long", "dlq", person(5, gender="F" * 51), ["gender"], "string over column length")
# Wrong types.
both("dead-is-text", "dlq", person(6, dead="no"), ["dead"], "wrong column type")
both("person-id-object", "dlq", person(7, voided={"x": 1}), ["voided"], "wrong column type")
# A reference to a row no site has.
e = person(8)
e["refs"] = {"creator": "{BAD_UUID}"}
both("creator-missing", "dlq", e, ["{BAD_UUID}"], "reference to a nonexistent uuid")
# Unknown table and column.
both("unknown-table", "dlq", ev("omrs_not_a_table", {"id": 1}, u(9), {"id": 1, "uuid": u(9)}, {}), ["omrs_not_a_table"], "unknown table")
# A column HQ lacks (a site on a newer OpenMRS) is left out with a warning; the row applies.
both("unknown-column", "applied", loc(10, not_a_column=5), category="column HQ lacks", uuid_=u(10))
# Good rows between them.
both("good-person", "applied", person(11), category="good", uuid_=u(11))
both("good-location", "applied", loc(12), category="good", uuid_=u(12))
both("good-unicode", "applied", loc(13, name="Kliniki ya Afya — Kisumu, Ñandú"), category="good", uuid_=u(13))
# A four-byte character in an OpenMRS 2.x (utf8mb3) column: HQ refuses it, naming the column.
both("emoji-in-utf8mb3", "dlq", loc(29, name="Clinic 🏥"), ["name", "incorrect string"], "character the column cannot hold")
# Raw oddities.
add("empty", "cdc", "dlq", "", ["eof", "json", "empty"], "invalid json")
add("empty-hq", "hq", "dlq", "", ["eof", "json", "empty"], "invalid json")
add("bom", "cdc", "dlq", "\ufeff" + json.dumps(loc(14)), ["expected", "json", "invalid"], "invalid json")
add("nan", "cdc", "dlq", json.dumps(loc(15)).replace('"ts_ms": 1795660100000}', '"ts_ms": NaN}').replace('"ts_ms":1795660100000}', '"ts_ms":NaN}'), ["expected", "json", "invalid", "ts_ms"], "invalid json")
add("huge-number", "cdc", "dlq", json.dumps(loc(16)).replace("1795660100000", "1e400"), ["number", "invalid", "ts_ms", "expected"], "wrong field type")
add("deep", "cdc", "dlq", "[" * 5000 + "]" * 5000, ["recursion", "json", "invalid type", "expected"], "invalid json")
add("deep-hq", "hq", "dlq", "{\"type\":\"change\",\"late\":false,\"event\":" + "[" * 5000 + "]" * 5000 + "}", ["recursion", "invalid", "expected", "not an omrs.hq.changes record"], "invalid json")
add("dup-keys", "cdc", "dlq", json.dumps(loc(17))[:-1] + ',"op":"zz"}', ["duplicate field", "unknown variant", "op"], "invalid json")
add("array-of-events", "cdc", "dlq", "[" + json.dumps(loc(18)) + "]", ["invalid type", "map", "expected"], "not an object")
add("two-objects", "cdc", "dlq", json.dumps(loc(19)) + json.dumps(loc(20)), ["trailing"], "invalid json")
add("heartbeat-with-row", "cdc", "dlq", json.dumps(dict(loc(21), op="h")), ["heartbeat", "h"], "per-op shape")
add("snapshot-without-after", "cdc", "dlq", json.dumps(dict(loc(22), op="r", after=None)), ["after"], "per-op shape")
add("negative-position", "cdc", "dlq", json.dumps(loc(23)).replace('"pos": 4', '"pos": -4'), ["invalid value", "pos", "expected"], "wrong field type")
add("merge-without-loser", "hq", "dlq", json.dumps({"type": "merge", "winner": u(24), "reason": "identifier", "evidence": {}, "site": "site-a", "ts_ms": 1}), ["loser", "missing field"], "missing field")
add("aggregate-unknown", "hq", "dlq", json.dumps({"type": "aggregate", "name": "no_such_aggregate", "site": "site-a", "window_start_ms": 0, "window_end_ms": 1, "dim": "", "value": 1, "final": True, "revision": 1, "watermark_ms": 1}), ["no_such_aggregate"], "unknown aggregate")
add("change-of-other-site", "cdc", "dlq", json.dumps(dict(loc(25), site="site-b")), ["site"], "unknown site")
add("null-site", "cdc", "dlq", json.dumps(dict(loc(26), site=None)), ["site", "invalid type"], "wrong field type")
add("control-chars", "cdc", "dlq", json.dumps(loc(27)).replace("Hand clinic 27", "Hand\u0001clinic").replace("\\u0001", "\u0001"), ["control character"], "invalid json")

with open(os.path.join(HERE, "hand.jsonl"), "w") as f:
    for c in cases:
        f.write(json.dumps(c, separators=(",", ":")) + "\n")
print(f"{len(cases)} cases written to tests/corpus/hand.jsonl")
