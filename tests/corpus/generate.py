#!/usr/bin/env python3
"""Writes tests/corpus/generated.jsonl: bad-input cases for tests/corpus.rs, derived from valid
records by systematic mutation (deterministic: the same file every run). Hand-written cases are
in hand.jsonl. One JSON object per line:

  id        unique case id
  topic     "cdc" (fed into omrs.cdc.site-a) or "hq" (fed into omrs.hq.changes)
  expect    "dlq": dead-lettered with a reason containing one of `reason` (case-insensitive);
            "applied": a good record, which must reach HQ (its uuid is `uuid`)
  reason    substrings, any of which the dead letter's reason must contain
  payload   the record's text, with {USER} {LOCATION} {BAD_UUID} filled in by the test
  payload_b64  instead of payload, raw bytes (invalid UTF-8)
  category  what kind of badness, for the summary

Run: python3 tests/corpus/generate.py (from the repo root).
"""
import base64
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
rng = random.Random(20261126)
cases = []
n_loc = [1000]


def uuid(tag, i):
    return f"{tag:0>8}-0000-4000-8000-{i:012d}"


def location_after(i, u, **over):
    row = {"location_id": i, "name": f"Corpus clinic {i}", "description": "generated", "creator": 1,
           "date_created": "2026-11-20 10:00:00", "retired": 0, "uuid": u}
    row.update(over)
    return row


def site_event(i, u, after=None, op="c", before=None, refs=None, **over):
    ev = {"op": op, "site": "site-a", "table": "location", "key": {"location_id": i}, "uuid": u,
          "before": before, "after": after if after is not None else location_after(i, u),
          "refs": refs if refs is not None else {"creator": "{USER}"},
          "source": {"server_id": 11, "gtid": None, "file": "mariadb-bin.000001", "pos": 4 + i, "row": 0,
                     "ts_ms": 1795660000000 + i, "snapshot": False},
          "ts_ms": 1795660000000 + i}
    ev.update(over)
    return ev


def hq_record(ev, late=False):
    return {"type": "change", "late": late, "event": ev}


def dump(o):
    return json.dumps(o, separators=(",", ":"))


def add(cid, topic, expect, payload=None, reason=(), category="", uuid_=None, raw=None):
    c = {"id": cid, "topic": topic, "expect": expect, "category": category}
    if raw is not None:
        c["payload_b64"] = base64.b64encode(raw).decode()
    else:
        c["payload"] = payload
    if reason:
        c["reason"] = list(reason)
    if uuid_:
        c["uuid"] = uuid_
    cases.append(c)


def next_loc(tag):
    n_loc[0] += 1
    i = n_loc[0]
    return i, uuid(tag, i)


def good(topic):
    i, u = next_loc("9000d")
    ev = site_event(i, u)
    add(f"good-{i}", topic, "applied", dump(ev if topic == "cdc" else hq_record(ev)), category="good", uuid_=u)


JSON_ERR = ["json", "eof", "expected", "invalid", "trailing", "control character", "unicode", "utf-8", "key must be a string"]

for topic in ("cdc", "hq"):
    wrap = (lambda e: e) if topic == "cdc" else hq_record
    # 1. Truncated records: a valid record cut at 80 points.
    i, u = next_loc("1000a")
    text = dump(wrap(site_event(i, u)))
    for k, cut in enumerate(sorted(rng.sample(range(1, len(text) - 1), 130))):
        add(f"{topic}-trunc-{k}", topic, "dlq", text[:cut], JSON_ERR, "truncated")
        if k % 10 == 9:
            good(topic)
    # 2. Garbage: random printable text, random bytes that are still UTF-8, JSON that is not an object.
    for k in range(80):
        n = rng.randint(1, 200)
        g = "".join(chr(rng.randint(32, 126)) for _ in range(n))
        if g.strip().startswith("{") and g.strip().endswith("}"):
            g = "x" + g
        add(f"{topic}-garbage-{k}", topic, "dlq", g, JSON_ERR + ["unknown variant", "missing field", "number", "string"], "garbage")
        if k % 10 == 9:
            good(topic)
    for k, v in enumerate(["null", "true", "42", "\"text\"", "[]", "[1,2]", "{}", "[{\"op\":\"c\"}]"]):
        add(f"{topic}-notobject-{k}", topic, "dlq", v, JSON_ERR + ["missing field", "map", "invalid type", "type"], "not an object")
    # 3. Invalid UTF-8 inside a string value.
    for k in range(40):
        i, u = next_loc("1000b")
        t = dump(wrap(site_event(i, u))).encode()
        pos = t.index(b"Corpus clinic")
        bad = bytes([rng.choice([0x80, 0xbf, 0xc0, 0xc1, 0xf5, 0xfe, 0xff])])
        add(f"{topic}-utf8-{k}", topic, "dlq", raw=t[:pos] + bad + t[pos:], reason=JSON_ERR, category="invalid utf-8")
    good(topic)

# 4. Site topic records with broken shapes (the transform's decoder).
i, u = next_loc("1000c")
base = site_event(i, u)
fields = ["op", "site", "source", "ts_ms"]
for k, f in enumerate(fields):
    for rep in range(5):
        i, u = next_loc("1000c")
        ev = site_event(i, u)
        del ev[f]
        add(f"cdc-missing-{f}-{rep}", "cdc", "dlq", dump(ev), [f"missing field `{f}`", f], "missing field")
for rep in range(10):
    for op, drop_, why in (("c", "after", "after"), ("d", "before", "before"), ("u", "before", "before"), ("u", "after", "after")):
        i, u = next_loc("1000d")
        ev = site_event(i, u, op=op, before=location_after(i, u) if op in ("d", "u") else None)
        if op == "d":
            ev["after"] = None
        ev[drop_] = None
        add(f"cdc-shape-{op}-{drop_}-{rep}", "cdc", "dlq", dump(ev), [why, "image"], "per-op shape")
    good("cdc")
for k, op in enumerate(["x", "C", "", "insert", "delete", "r2", "H", "update", "cc", "q"]):
    for rep in range(3):
        i, u = next_loc("1000e")
        add(f"cdc-op-{k}-{rep}", "cdc", "dlq", dump(site_event(i, u, op=op)), ["unknown variant", "op"], "unknown op")
wrong = {"op": 1, "site": 5, "table": 7, "source": "here", "ts_ms": "soon", "refs": [1], "key": "k", "uuid": 12}
for f, v in wrong.items():
    for rep in range(5):
        i, u = next_loc("1000f")
        ev = site_event(i, u)
        ev[f] = v
        add(f"cdc-type-{f}-{rep}", "cdc", "dlq", dump(ev), ["invalid type", "expected", "key", "refs", "source", "site", "table", "uuid"], "wrong field type")
    good("cdc")
for rep in range(20):
    i, u = next_loc("10010")
    add(f"cdc-othersite-{rep}", "cdc", "dlq", dump(site_event(i, u, site=f"site-z{rep}")), ["site"], "unknown site")
for rep in range(10):
    i, u = next_loc("10011")
    ev = site_event(i, u)
    ev["extra_field"] = rep
    add(f"cdc-unknownfield-{rep}", "cdc", "dlq", dump(ev), ["unknown field", "extra_field"], "unknown field")

# 5. Well-formed events the sinks must refuse, fed both ways (through the transform, and
# straight into omrs.hq.changes).
for topic in ("cdc", "hq"):
    wrap = (lambda e: e) if topic == "cdc" else hq_record
    for rep in range(20):
        i, u = next_loc("20001")
        add(f"{topic}-table-{rep}", topic, "dlq", dump(wrap(site_event(i, u, table=f"no_such_table_{rep}"))), [f"no_such_table_{rep}"], "unknown table")
        i, u = next_loc("20002")
        ev = site_event(i, u)
        ev["uuid"] = None
        ev["after"]["uuid"] = None
        add(f"{topic}-nouuid-{rep}", topic, "dlq", dump(wrap(ev)), ["uuid"], "missing uuid")
        i, u = next_loc("20003")
        add(f"{topic}-long-{rep}", topic, "dlq", dump(wrap(site_event(i, u, after=location_after(i, u, name="n" * (256 + rep * 40))))), ["name", "too long"], "string over column length")
        i, u = next_loc("20004")
        add(f"{topic}-type-{rep}", topic, "dlq", dump(wrap(site_event(i, u, after=location_after(i, u, retired=["yes", "no", "maybe"][rep % 3])))), ["retired"], "wrong column type")
        i, u = next_loc("20005")
        add(f"{topic}-badref-{rep}", topic, "dlq", dump(wrap(site_event(i, u, refs={"creator": "{BAD_UUID}"}))), ["{BAD_UUID}", "creator", "users"], "reference to a nonexistent uuid")
        i, u = next_loc("20006")
        add(f"{topic}-baddate-{rep}", topic, "dlq", dump(wrap(site_event(i, u, after=location_after(i, u, date_created=["2026-13-45 99:99:99", "not a date", "2026-02-30 10:00:00"][rep % 3])))), ["date_created"], "date out of range")
        if rep % 3 == 2:
            good(topic)
    # Dates at the edges of the range are data, not errors: applied.
    for rep, d in enumerate(["9999-12-31 23:59:59", "1000-01-01 00:00:00", "1970-01-01 00:00:01"]):
        i, u = next_loc("20007")
        add(f"{topic}-edgedate-{rep}", topic, "applied", dump(wrap(site_event(i, u, after=location_after(i, u, date_created=d)))), category="date at the edge of the range", uuid_=u)
    # Duplicate events: the same change twice is applied once.
    for rep in range(5):
        i, u = next_loc("20008")
        rec = dump(wrap(site_event(i, u)))
        add(f"{topic}-dup-{rep}-a", topic, "applied", rec, category="duplicate event", uuid_=u)
        add(f"{topic}-dup-{rep}-b", topic, "applied", rec, category="duplicate event", uuid_=u)

# 6. omrs.hq.changes records of unknown type or broken envelope.
for rep, t in enumerate(["chnage", "delete", "merge_all", "", "CHANGE"]):
    for k in range(3):
        add(f"hq-type-{rep}-{k}", "hq", "dlq", dump({"type": t, "late": False, "event": {}}), ["unknown variant", "type", "not an omrs.hq.changes record"], "unknown record type")
for rep in range(10):
    i, u = next_loc("30001")
    ev = site_event(i, u)
    del ev["source"]
    add(f"hq-nosource-{rep}", "hq", "dlq", dump(hq_record(ev)), ["source"], "missing field")

with open(os.path.join(HERE, "generated.jsonl"), "w") as f:
    for c in cases:
        f.write(json.dumps(c, separators=(",", ":")) + "\n")
print(f"{len(cases)} cases written to tests/corpus/generated.jsonl")
