"""Reference keywords for the analyze function's agreement test.

Reads one paragraph per line and prints, as JSON, the top-10 keywords that the Python
implementation the original design used (`jieba.analyse.extract_tags(text, topK=10)`) gives for
each: `{"jieba": "<version>", "keywords": [[...], ...]}`.

    python scripts/jieba_reference.py tests/fixtures/zh_paragraphs.txt

With `--write FILE` the same document is written to FILE (that is how
tests/fixtures/zh_reference_keywords.json is regenerated).
"""

import argparse
import json
import logging
import sys

import jieba
import jieba.analyse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paragraphs", help="UTF-8 text file, one paragraph per line")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--write", help="also write the JSON document to this file")
    args = parser.parse_args()

    # jieba reports building its prefix dictionary on stderr; keep the output to the JSON.
    jieba.setLogLevel(logging.WARNING)
    with open(args.paragraphs, encoding="utf-8") as handle:
        paragraphs = [line.strip() for line in handle if line.strip()]
    document = {
        "jieba": jieba.__version__,
        "top_k": args.top_k,
        "keywords": [jieba.analyse.extract_tags(p, topK=args.top_k) for p in paragraphs],
    }
    # One paragraph's keywords per line, so a change shows up as a one-line diff.
    rows = ",\n  ".join(json.dumps(k, ensure_ascii=False) for k in document["keywords"])
    text = (
        f'{{"jieba": {json.dumps(document["jieba"])}, "top_k": {document["top_k"]},\n'
        f' "keywords": [\n  {rows}\n ]}}'
    )
    if args.write:
        with open(args.write, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
