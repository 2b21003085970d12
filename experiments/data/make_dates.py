"""Write a small prompt/response data set for `task=sft`: dates rewritten in words.

    python experiments/data/make_dates.py [--out experiments/data/dates] [--train 800] [--test 100]

Writes OUT/train.jsonl and OUT/test.jsonl, one {"prompt", "response", "label"} object a line:
"Write the date 2023-07-14 in words." -> "14 July 2023". The label is the prompt's phrasing (one
of four), so a partitioner can split the clients non-IID. Deterministic (its own seed); train and
test dates never repeat. The task is learnable by a small causal LM in a few hundred examples
(copy the day and year, look the month up), and the whole response is the answer, so it shows
the `sft` task's default exact-match rule (whitespace-normalised text) on the user's own files:

    python -m fedlora.simulate task=sft data.path=experiments/data/dates strategy=fedavg
"""

import argparse
import datetime
import json
import random
from pathlib import Path

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
PHRASINGS = ("Write the date {} in words.", "How is {} written out in words?",
             "Spell out the date {}.", "Rewrite {} as day, month name and year.")


def in_words(date: datetime.date) -> str:
    return f"{date.day} {MONTHS[date.month - 1]} {date.year}"


def rows(count: int, rng: random.Random, used: set) -> list[dict]:
    out = []
    while len(out) < count:
        date = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 90))
        if date in used:
            continue
        used.add(date)
        label = rng.randrange(len(PHRASINGS))
        out.append({"prompt": PHRASINGS[label].format(date.isoformat()),
                    "response": in_words(date), "label": label})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/data/dates")
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--test", type=int, default=100)
    args = parser.parse_args()
    rng, used = random.Random(7), set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", args.train), ("test", args.test)):
        with open(out / f"{name}.jsonl", "w") as handle:
            for row in rows(count, rng, used):
                handle.write(json.dumps(row) + "\n")
    print(f"wrote {args.train} + {args.test} examples to {out}/")


if __name__ == "__main__":
    main()
