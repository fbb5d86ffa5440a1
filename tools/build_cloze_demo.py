"""Build the embedded offline cloze example demo_data/cloze/{train,dev}.json from demo_data/{train,dev}.json.

    python tools/build_cloze_demo.py                 # writes demo_data/cloze/
    python tools/build_cloze_demo.py --output_dir D  # same files under D

Which product category does an ad describe? Each ad (a demo row's `summary`) has its first mention of
the category (上衣, 裙, 裤, 鞋, 包) replaced by [MASK]; the choices are the five categories, the label the
right one. The ad's other words (材质, 裙长, 鞋跟, ...) tell the category, so a small model can learn it.
Deterministic: a test rebuilds and compares bytes.
"""

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = ["上衣", "裙", "裤", "鞋", "包"]


def category_of(content: str) -> str:
    return dict(pair.split("#", 1) for pair in content.split("*"))["类型"]


def cloze_row(row: dict) -> dict:
    category = category_of(row["content"])
    if category not in row["summary"]:
        raise ValueError(f"the category {category} is not in the summary {row['summary']!r}")
    return {
        "inputs_pretokenized": row["summary"].replace(category, "[MASK]", 1),
        "choices_pretokenized": CATEGORIES,
        "label": CATEGORIES.index(category),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "demo_data", "cloze"))
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    for split in ("train", "dev"):
        with open(os.path.join(ROOT, "demo_data", f"{split}.json"), encoding="utf-8") as f:
            rows = [cloze_row(json.loads(line)) for line in f if line.strip()]
        with open(os.path.join(args.output_dir, f"{split}.json"), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{split}: {len(rows)} rows")


if __name__ == "__main__":
    main()
