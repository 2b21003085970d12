"""Write a second real classification set as one JSONL file: which language is this sentence?

    python experiments/data/make_language_id.py OUT.jsonl

Sentences come from the chatterbot-corpus wheel (installed with fedlora), nine languages
written in Latin script, so the task cannot be solved from the script alone. Each line is
``{"sentence": ..., "language": ...}``: use it with
``data.path=OUT.jsonl data.text_field=sentence data.label_field=language`` (split by
``data.test_fraction``).
"""

import json
import sys
from pathlib import Path

import chatterbot_corpus
import yaml

LANGUAGES = ("dutch", "french", "german", "indonesian", "italian", "portuguese", "spanish",
             "swedish", "turkish")


def rows():
    root = Path(chatterbot_corpus.__file__).parent / "data"
    seen = set()
    for language in LANGUAGES:
        for topic_file in sorted((root / language).glob("*.yml")):
            for conversation in yaml.safe_load(topic_file.read_text(encoding="utf-8"))["conversations"]:
                for utterance in conversation:
                    text = " ".join(str(utterance).split())
                    if len(text) >= 3 and text not in seen:
                        seen.add(text)
                        yield {"sentence": text, "language": language}


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python {sys.argv[0]} OUT.jsonl")
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out.open("w", encoding="utf-8") as f:
        for row in rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    print(f"wrote {count} sentences in {len(LANGUAGES)} languages to {out}")


if __name__ == "__main__":
    main()
