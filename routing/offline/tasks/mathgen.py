"""A seeded generator of arithmetic problems at five difficulty levels, with disjoint splits.

1: a + b (one digit)   2: one step, two-digit numbers (+, -, x by a digit)   3: two steps (a + b x c)
4: three steps with parentheses   5: a short multi-step word problem.
A problem belongs to the held-out split iff sha256(question) % 10 == 0, so the splits never overlap and
every (seed, split, level, n) gives the same list."""

from __future__ import annotations

import random

from .base import Example, stable_hash

NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana")
ITEMS = ("apples", "books", "coins", "pens", "shells", "stamps", "cards", "marbles")


def _problem(level: int, rng: random.Random) -> tuple[str, int]:
    r = rng.randint
    if level == 1:
        a, b = r(1, 9), r(1, 9)
        return f"What is {a} + {b}?", a + b
    if level == 2:
        op = rng.choice("+-x")
        a, b = r(10, 99), (r(10, 99) if op != "x" else r(2, 9))
        if op == "-" and b > a:
            a, b = b, a
        return f"What is {a} {op} {b}?", a + b if op == "+" else a - b if op == "-" else a * b
    if level == 3:
        a, b, c = r(2, 20), r(2, 9), r(2, 9)
        if rng.random() < 0.5:
            return f"What is {a} + {b} x {c}?", a + b * c
        return f"What is {b} x {c} - {a}?", b * c - a
    if level == 4:
        a, b, c, d = r(2, 20), r(2, 20), r(2, 9), r(1, 20)
        return f"What is ({a} + {b}) x {c} - {d}?", (a + b) * c - d
    n1, n2 = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b, c = r(5, 30), r(2, 9), r(2, 5)
    q = (f"{n1} has {a} {item}. {n2} gives {n1} {b} bags with {c} {item} in each bag. "
         f"How many {item} does {n1} have now?")
    return q, a + b * c


def _split_of(question: str) -> str:
    return "heldout" if stable_hash(question) % 10 == 0 else "train"


def make_math(levels: tuple[int, ...] = (1, 2, 3, 4, 5), n_per_level: int = 100, split: str = "train",
              seed: int = 0) -> list[Example]:
    if split not in ("train", "heldout"):
        raise ValueError("split must be 'train' or 'heldout'")
    out: list[Example] = []
    for level in levels:
        if level not in (1, 2, 3, 4, 5):
            raise ValueError(f"math level {level} is not in 1..5")
        rng = random.Random(f"{seed}-{level}-{split}")
        seen: set[str] = set()
        tries = 0
        while len(seen) < n_per_level and tries < 200 * n_per_level:
            tries += 1
            q, a = _problem(level, rng)
            if q in seen or _split_of(q) != split:
                continue
            seen.add(q)
            out.append(Example(f"math-l{level}-{split}-{len(seen) - 1}", f"math-l{level}", q, (), str(a)))
    return out


def make_math_spec(spec: str) -> list[Example]:
    """'levels=1-5,n=100,split=heldout,seed=0' (any subset, these defaults) -> examples. Raises ValueError
    for another key, or a part without '=' (a typo must not quietly give the defaults)."""
    kv = spec_keys(spec, ("levels", "n", "split", "seed"), "math")
    lv = kv.get("levels", "1-5")
    if "-" in lv:
        lo, hi = (int(x) for x in lv.split("-"))
        levels = tuple(range(lo, hi + 1))
    else:
        levels = tuple(int(x) for x in lv.split("+"))
    return make_math(levels, int(kv.get("n", 100)), kv.get("split", "train"), int(kv.get("seed", 0)))


def spec_keys(spec: str, allowed: tuple[str, ...], kind: str) -> dict[str, str]:
    """'k=v,k=v' (';' also separates) -> {k: v}. Raises ValueError for a key outside `allowed` or a part
    without '='."""
    kv: dict[str, str] = {}
    for part in filter(None, (x.strip() for x in spec.replace(";", ",").split(","))):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in allowed:
            raise ValueError(f"--data {kind}:{spec}: {part!r} is not one of {', '.join(k + '=' for k in allowed)}")
        kv[key.strip()] = value.strip()
    return kv


def make_compare(n: int = 200, seed: int = 0) -> list[Example]:
    """An out-of-domain multiple-choice family (in neither ARC nor the arithmetic problems): pick the
    largest or the smallest of four numbers. Seeded."""
    rng = random.Random(f"compare-{seed}")
    out = []
    for i in range(n):
        nums = rng.sample(range(1, 100), 4)
        largest = rng.random() < 0.5
        gold = nums.index(max(nums) if largest else min(nums))
        q = f"Which number is the {'largest' if largest else 'smallest'}?"
        out.append(Example(f"compare-{seed}-{i}", "compare", q, tuple(str(x) for x in nums), str(gold)))
    return out
