"""Write the tiny pair's held-out code prompts as a DeepSpec-format eval file, for `dspark-build eval`.

    python bench/heldout_jsonl.py [--prompts 32] [-o build/eval-data/stdlib-heldout.jsonl]

The prompts are bench/tau.py's: part 1 of the held-out standard-library files (STS calibration used
part 0; training never saw either). One JSON object a line, {"turns": [prompt], "domain": "code"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dspark_trt.builder.corpus import heldout_prompts

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("-o", "--out", type=Path, default=ROOT / "build" / "eval-data" / "stdlib-heldout.jsonl")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"turns": [prompt], "domain": "code"} for prompt in heldout_prompts(args.prompts, part=1)]
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} prompts to {args.out}")


if __name__ == "__main__":
    main()
