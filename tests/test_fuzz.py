"""Fuzzing dkgm_aug.load: mutated, truncated and random files must raise CheckpointError
(or load, when a mutation happens to keep the file valid), never anything else."""
import json
import random
import struct
import time

import pytest
import torch

import dkgm_aug
from dkgm_aug import CheckpointError
from dkgm_aug.checkpoint import METADATA_KEY
from conftest import micro_model

ODD_VALUES = [-1, 0, 1, 10 ** 9, 2 ** 63, -2 ** 70, 1.5, float("inf"), "x", "", None, True, [], {}, [1] * 50,
              {"a": 1}, [[[]]], "gaussian", "epanechnikov"]


def header(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def with_header(data: bytes, head: dict) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def mutate_config(rng: random.Random, meta: dict) -> dict:
    """Replace, drop or add one value somewhere in the metadata JSON."""
    parent, key = meta, rng.choice(list(meta))
    for _ in range(rng.randint(0, 3)):
        child = parent[key]
        if isinstance(child, dict) and child:
            parent, key = child, rng.choice(list(child))
        elif isinstance(child, list) and child:
            parent, key = child, rng.randrange(len(child))
        else:
            break
    r = rng.random()
    if isinstance(parent, dict) and r < 0.15:
        del parent[key]
    elif isinstance(parent, dict) and r < 0.25:
        parent[rng.choice(["bogus", "stage3", "x"])] = rng.choice(ODD_VALUES)
    else:
        parent[key] = rng.choice(ODD_VALUES)
    return meta


def cases(valid: bytes, rng: random.Random):
    n, head = header(valid)
    yield "valid", valid
    for _ in range(200):
        yield "truncated", valid[:rng.randrange(len(valid))]
    for _ in range(250):
        b = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(8, 8 + n)] = rng.randrange(256)
        yield "header byte flips", bytes(b)
    for _ in range(100):
        b = bytearray(valid)
        for _ in range(rng.randint(1, 20)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        yield "byte flips", bytes(b)
    for _ in range(100):
        yield "random bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(0, 4096)))
    for _ in range(50):
        yield "header length", struct.pack("<Q", rng.choice([0, 1, 7, n - 1, n + 1, len(valid), 2 ** 24, 2 ** 63])) + valid[8:]
    for _ in range(250):
        h = json.loads(json.dumps(head))
        meta = json.loads(h["__metadata__"][METADATA_KEY])
        h["__metadata__"][METADATA_KEY] = json.dumps(mutate_config(rng, meta))
        yield "config mutation", with_header(valid, h)
    for _ in range(100):
        h = json.loads(json.dumps(head))
        name = rng.choice([k for k in h if k != "__metadata__"])
        field = rng.choice(["shape", "dtype", "data_offsets"])
        h[name][field] = rng.choice([[10 ** 12], [0], [-1], "F64", "I8", [0, 10 ** 15], [5, 1], None, ODD_VALUES])
        yield "tensor header mutation", with_header(valid, h)


@pytest.mark.slow
def test_fuzz_load(tmp_path):
    torch.manual_seed(0)
    model = micro_model(image_size=8)
    path = tmp_path / "valid.safetensors"
    model.save(path)
    valid = path.read_bytes()
    rng = random.Random(0)
    tried, loaded, kinds = 0, 0, {}
    slowest, bugs = 0.0, []
    for kind, data in cases(valid, rng):
        p = tmp_path / "case.safetensors"
        p.write_bytes(data)
        t = time.perf_counter()
        try:
            dkgm_aug.load(p)
            loaded += 1
        except CheckpointError:
            kinds[kind] = kinds.get(kind, 0) + 1
        except Exception as exc:   # anything else is a bug the fuzzer found
            bugs.append(f"{kind}: {type(exc).__name__}: {exc}")
        slowest = max(slowest, time.perf_counter() - t)
        tried += 1
    assert not bugs, "\n".join(sorted(set(bugs))[:20])
    assert tried >= 1000
    assert slowest < 5.0                       # no hang
    assert kinds.get("truncated", 0) >= 190 and kinds.get("random bytes") == 100
    print(f"fuzz: {tried} files, {loaded} loaded, rejected by kind: {kinds}, slowest {slowest:.2f}s")
