"""Generate the k-shot tasks shipped for head / FFN importance (editing_core/importance_tasks/).

    .venv/bin/python benchmarks/make_importance_tasks.py

Writes one JSONL file per task; each row is
    {"instruction": str, "examples": [{"input": str, "answer": str} x 5], "query": str, "answer": str}
The five examples of a row come from the same task (CounterFact: the same prompt template) and
never repeat the row's own query. The output is committed: the project never needs the shared
data at run time. Rerunning with the same data gives the same files (fixed seed).

Tasks:
    copy_word      repeat a common English word (an induction / copying task)
    capitals       country -> capital city, from the table below
    antonyms       word -> its opposite, from the table below
    counterfact    true facts of CounterFact (prompt -> ground_truth) whose answer is one short
                   word, from prompt templates about languages, countries and makers; at most
                   two rows per (template, answer) so that a majority guess does not score well
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "editing_core" / "importance_tasks"
SHARED_DATA = Path(os.environ.get("EDITFLOW_SHARED_DATA", ROOT.parent / "shared" / "data"))
SHOTS = 5

WORDS = (
    "apple house river window garden table music doctor winter summer mountain forest paper "
    "bridge school flower money coffee water family dinner market island camera letter pencil "
    "rabbit silver castle engine jacket orange planet rocket shadow sugar ticket tiger valley "
    "wallet yellow anchor basket butter candle carpet dragon finger guitar hammer helmet kitchen "
    "ladder lemon mirror monkey needle office pepper pillow pocket puzzle rubber saddle salad "
    "season spider square stone thunder tomato tunnel velvet village violin wagon whale wizard "
    "cloud horse chair bottle"
).split()

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo",
    "Denmark": "Copenhagen", "Finland": "Helsinki", "Iceland": "Reykjavik", "Russia": "Moscow",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Turkey": "Ankara", "Egypt": "Cairo", "Morocco": "Rabat", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Japan": "Tokyo",
    "China": "Beijing", "South Korea": "Seoul", "India": "New Delhi", "Pakistan": "Islamabad",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Malaysia": "Kuala Lumpur", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh",
    "Israel": "Jerusalem", "Afghanistan": "Kabul", "Australia": "Canberra", "New Zealand": "Wellington",
    "Canada": "Ottawa", "United States": "Washington", "Mexico": "Mexico City", "Cuba": "Havana",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima",
    "Colombia": "Bogota", "Venezuela": "Caracas",
}

ANTONYMS = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "old": "young",
    "open": "closed", "light": "dark", "rich": "poor", "early": "late", "strong": "weak",
    "high": "low", "long": "short", "hard": "soft", "full": "empty", "wet": "dry", "clean": "dirty",
    "loud": "quiet", "thick": "thin", "heavy": "light", "true": "false", "good": "bad",
    "win": "lose", "buy": "sell", "push": "pull", "begin": "end", "inside": "outside", "above": "below",
    "left": "right", "day": "night", "north": "south", "east": "west", "love": "hate",
    "friend": "enemy", "question": "answer", "cheap": "expensive", "safe": "dangerous",
    "easy": "difficult", "first": "last", "wide": "narrow", "deep": "shallow", "sweet": "sour",
    "brave": "cowardly", "alive": "dead", "awake": "asleep", "before": "after", "always": "never",
    "more": "less", "black": "white", "near": "far", "give": "take",
    "come": "go", "laugh": "cry", "accept": "reject", "arrive": "leave", "increase": "decrease",
    "remember": "forget", "success": "failure", "victory": "defeat", "war": "peace",
    "male": "female", "king": "queen", "entrance": "exit", "noisy": "silent", "smooth": "rough",
    "tall": "short", "polite": "rude", "sharp": "blunt",
}

COUNTERFACT_TEMPLATES = (
    "The mother tongue of {} is",
    "The native language of {} is",
    "The official language of {} is",
    "{} is developed by",
    "{} is created by",
    "{} is located in the country of",
    "{} holds a citizenship from",
    "{} was employed in",
)


def with_examples(pairs: Sequence[tuple[str, str]], instruction: str, rng: random.Random,
                  pool: Sequence[tuple[str, str]] | None = None) -> list[dict]:
    """One row per (query, answer) pair; its examples are SHOTS other pairs of `pool` (default:
    `pairs`) with a different input."""
    pool = list(pool if pool is not None else pairs)
    rows = []
    for query, answer in pairs:
        others = [p for p in pool if p[0] != query]
        examples = rng.sample(others, SHOTS)
        rows.append({"instruction": instruction, "examples": [{"input": i, "answer": a} for i, a in examples],
                     "query": query, "answer": answer})
    return rows


def copy_word(rng: random.Random) -> list[dict]:
    words = list(dict.fromkeys(WORDS))
    return with_examples([(w, w) for w in words], "Repeat the word.", rng)


def capitals(rng: random.Random) -> list[dict]:
    return with_examples(list(CAPITALS.items()), "Give the capital city of the country.", rng)


def antonyms(rng: random.Random) -> list[dict]:
    return with_examples(list(ANTONYMS.items()), "Give the opposite of the word.", rng)


def counterfact(rng: random.Random, path: Path, per_answer: int = 2, rows: int = 100) -> list[dict]:
    """True facts (prompt -> ground_truth) of a few templates; examples from the same template."""
    data = json.loads(path.read_text(encoding="utf-8"))
    by_template: dict[str, list[tuple[str, str]]] = defaultdict(list)
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for record in data:
        subject, prompt, answer = record["subject"], record["prompt"], record["ground_truth"].strip()
        template = prompt.replace(subject, "{}", 1) if subject in prompt else None
        if template not in COUNTERFACT_TEMPLATES or " " in answer or len(answer) > 12:
            continue
        if seen[template, answer] >= per_answer:
            continue
        seen[template, answer] += 1
        by_template[template].append((prompt, answer))
    out = []
    for template in COUNTERFACT_TEMPLATES:
        pairs = by_template[template]
        if len(pairs) > SHOTS:
            out.extend(with_examples(pairs, "Complete the fact.", rng))
    rng.shuffle(out)
    return out[:rows]


def write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--counterfact", type=Path, default=SHARED_DATA / "counterfact" / "train.json")
    parser.add_argument("--skip", nargs="*", default=[], help="task names not to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tasks = {
        "copy_word": lambda rng: copy_word(rng),
        "capitals": lambda rng: capitals(rng),
        "antonyms": lambda rng: antonyms(rng),
        "counterfact": lambda rng: counterfact(rng, args.counterfact),
    }
    for name, build in tasks.items():
        if name not in args.skip:
            write(build(random.Random(f"{args.seed}:{name}")), args.out / f"{name}.jsonl")


if __name__ == "__main__":
    main()
