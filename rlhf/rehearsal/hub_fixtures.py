"""Local folders in the layouts of the paper datasets' hub repositories, filled with generated rows.

Each folder is what `huggingface_hub.snapshot_download` of the real repository gives (the files, their names and
formats, the README's `configs:`), so the pipeline's loaders take exactly the code path they take on a hub id:
  vwxyzjn/summarize_from_feedback_tldr_3_filtered   data/{train,validation,test}-00000-of-00001.parquet
  tatsu-lab/alpaca_farm                             a loading script alpaca_farm.py beside alpaca_instructions/
                                                    {sft,preference,unlabeled,val}.json (and the preference configs'
                                                    folders), which `datasets` >= 4 refuses to run
  openai/gsm8k                                      {main,socratic}/{train,test}-00000-of-00001.parquet
  DigitalLearningGmbH/MATH-lighteval                data/{train,test}-... (config default) and one folder per subject
The rows are generated (small, seeded) with the real columns, in texts short enough for tiny stand-in models; they
carry a learnable signal (summaries restate the post, answers follow from the question) so stand-ins trained on them
write completions that end, and golds and judges have something to prefer.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

HUB_LAYOUTS = ("tldr", "alpaca_farm", "gsm8k", "math")

_NAMES = ["Anna", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kira", "Leo"]
_PLACES = ["work", "college", "the gym", "a party", "the lake", "my old school", "a concert", "the bakery"]
_TROUBLES = [("keeps borrowing money and never pays it back", "never repays money"),
             ("stopped answering my texts", "ignores my texts"),
             ("wants to move to another city", "wants to move away"),
             ("forgot my birthday again", "forgot my birthday"),
             ("eats my food without asking", "eats my food"),
             ("is always late when we meet", "is always late"),
             ("told my secret to everyone", "told my secret"),
             ("asked me to lend them my car", "wants my car")]
_FEELINGS = ["upset", "confused", "angry", "sad", "worried", "tired"]
_SUBREDDITS = ["relationships", "AskReddit", "personalfinance", "tifu", "offmychest"]


def _readme(configs: dict[str, dict[str, str]], note: str) -> str:
    """A dataset card whose YAML header declares the configs, as the hub repositories' cards do."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
    return "\n".join(lines + ["---", "", note, ""])


def _parquet(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folder / f"{name}-00000-of-00001.parquet", index=False)


def tldr_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        name, place, (trouble, short), feeling = (rng.choice(_NAMES), rng.choice(_PLACES), rng.choice(_TROUBLES),
                                                  rng.choice(_FEELINGS))
        age = rng.randint(19, 35)
        post = (f"I ({age}) met {name} at {place} two years ago. Lately {name} {trouble}. "
                f"I feel {feeling} about it and I do not know how to bring it up. What should I do?")
        summary = rng.choice([f"friend {name} {short} and I feel {feeling}, how do I talk about it?",
                              f"{name} {short}. I am {feeling}. What do I do?",
                              f"my friend {short}, I feel {feeling} and need advice",
                              f"{name} from {place} {short}, how do I bring it up?",
                              f"{short} and it makes me {feeling}"])
        rows.append({"id": f"t3_{i:05d}", "subreddit": rng.choice(_SUBREDDITS),
                     "title": f"My friend {name} {short}", "post": post, "summary": f" {summary}"})
    return rows


def write_tldr(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """vwxyzjn/summarize_from_feedback_tldr_3_filtered: id, subreddit, title, post, summary."""
    rng = random.Random(seed)
    for split, n in sizes.items():
        _parquet(root / "data", split, tldr_rows(n, rng))
    (root / "README.md").write_text(_readme({"default": {s: f"data/{s}-*" for s in sizes}},
                                            "Filtered TL;DR (Stiennon et al. 2020), rehearsal stand-in."))
    return root


def alpaca_rows(n: int, rng: random.Random) -> list[dict]:
    colors, animals = ["red", "blue", "green", "yellow"], ["cat", "dog", "horse", "owl", "fox"]
    rows = []
    for _ in range(n):
        kind = rng.randrange(5)
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        name, animal = rng.choice(_NAMES), rng.choice(animals)
        place, color = rng.choice(_PLACES), rng.choice(colors)
        if kind == 0:
            output = rng.choice([f"{a} plus {b} is {a + b}.", f"The sum is {a + b}.", f"{a + b}"])
            rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": output})
        elif kind == 1:
            output = rng.choice([f"{name} fed the {animal}.", f"Yesterday {name} fed the {animal}."])
            rows.append({"instruction": "Rewrite the sentence in the past tense.", "input": f"{name} feeds the {animal}.",
                         "output": output})
        elif kind == 2:
            output = rng.choice([f"The {color} {animal} sits quietly and watches the world go by.",
                                 f"A small {color} {animal} runs across the field.",
                                 f"This {animal} is {color} and very calm."])
            rows.append({"instruction": f"Describe a {color} {animal} in one sentence.", "input": "", "output": output})
        elif kind == 3:
            output = rng.choice([f"{name} met a {animal}.", f"A visit to {place}.", f"{name} and an old {animal}."])
            rows.append({"instruction": "Summarize the text in a few words.",
                         "input": f"{name} went to {place} and met an old {animal} there.", "output": output})
        else:
            output = rng.choice([f"You can meet friends like {name} and relax for a while.",
                                 "It is a good place to rest.", f"The {color} lights at {place} are lovely."])
            rows.append({"instruction": f"Give a reason to visit {place}.", "input": "", "output": output})
    return rows


ALPACA_SCRIPT = '''"""AlpacaFarm (Dubois et al. 2023): the repository's loading script, which `datasets` >= 4 no longer runs."""
import json

import datasets

_CONFIGS = ["alpaca_instructions", "alpaca_human_preference"]


class AlpacaFarm(datasets.GeneratorBasedBuilder):
    BUILDER_CONFIGS = [datasets.BuilderConfig(name=name) for name in _CONFIGS]

    def _info(self):
        return datasets.DatasetInfo()

    def _split_generators(self, dl_manager):
        raise NotImplementedError

    def _generate_examples(self, path):
        with open(path) as f:
            for i, row in enumerate(json.load(f)):
                yield i, row
'''


def write_alpaca_farm(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """tatsu-lab/alpaca_farm: a loading script and one JSON list per split of each config (instruction, input,
    output for alpaca_instructions; the human-preference config holds pairs, with other columns)."""
    rng = random.Random(seed)
    (root / "alpaca_instructions").mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        (root / "alpaca_instructions" / f"{split}.json").write_text(json.dumps(alpaca_rows(n, rng), indent=1))
    (root / "alpaca_human_preference").mkdir(exist_ok=True)
    pairs = [{"instruction": r["instruction"], "input": r["input"], "output_1": r["output"], "output_2": "No.",
              "preference": 1} for r in alpaca_rows(8, rng)]
    (root / "alpaca_human_preference" / "preference.json").write_text(json.dumps(pairs, indent=1))
    (root / "alpaca_farm.py").write_text(ALPACA_SCRIPT)
    (root / "README.md").write_text("# AlpacaFarm\n\nRehearsal stand-in of tatsu-lab/alpaca_farm (a script dataset).\n")
    return root


def gsm8k_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        name, a, b = rng.choice(_NAMES), rng.randint(2, 30), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        total, left = a + b, a + b - c
        rows.append({"question": f"{name} has {a} apples and buys {b} more. Then {name} gives {c} apples to a friend. "
                                 f"How many apples does {name} have now?",
                     "answer": f"{name} has {a} + {b} = <<{a}+{b}={total}>>{total} apples after buying.\n"
                               f"After giving {c} away, {name} has {total} - {c} = <<{total}-{c}={left}>>{left} apples.\n"
                               f"#### {left}"})
    return rows


def write_gsm8k(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """openai/gsm8k: configs main and socratic, question and answer (steps with <<calculator>> notes, `#### N`)."""
    rng = random.Random(seed)
    for split, n in sizes.items():
        rows = gsm8k_rows(n, rng)
        _parquet(root / "main", split, rows)
        _parquet(root / "socratic", split, [{**r, "question": r["question"]} for r in rows])
    configs = {c: {s: f"{c}/{s}-*" for s in sizes} for c in ("main", "socratic")}
    (root / "README.md").write_text(_readme(configs, "GSM8K (Cobbe et al. 2021), rehearsal stand-in."))
    return root


MATH_TYPES = ["Algebra", "Prealgebra", "Number Theory", "Counting & Probability", "Geometry"]


def math_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 20)
        kind = rng.choice(MATH_TYPES)
        rows.append({"problem": f"What is ${a} \\cdot {b} + {c}$?",
                     "level": f"Level {rng.randint(1, 5)}", "type": kind,
                     "solution": f"First, ${a} \\cdot {b} = {a * b}$. Then ${a * b} + {c} = {a * b + c}$, so the answer "
                                 f"is $\\boxed{{{a * b + c}}}$."})
    return rows


def write_math(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """DigitalLearningGmbH/MATH-lighteval: problem, level, solution, type; config default (all subjects) and one config
    per subject folder."""
    rng = random.Random(seed)
    splits = {split: math_rows(n, rng) for split, n in sizes.items()}
    configs = {"default": {s: f"data/{s}-*" for s in sizes}}
    for split, rows in splits.items():
        _parquet(root / "data", split, rows)
        for kind in MATH_TYPES:
            folder = kind.lower().replace(" & ", "_and_").replace(" ", "_")
            _parquet(root / folder, split, [r for r in rows if r["type"] == kind] or rows[:1])
            configs.setdefault(folder, {})[split] = f"{folder}/{split}-*"
    (root / "README.md").write_text(_readme(configs, "MATH (Hendrycks et al. 2021), rehearsal stand-in."))
    return root


WRITERS = {"tldr": write_tldr, "alpaca_farm": write_alpaca_farm, "gsm8k": write_gsm8k, "math": write_math}
SPLITS = {"tldr": ("train", "validation", "test"), "alpaca_farm": ("sft", "preference", "unlabeled", "val"),
          "gsm8k": ("train", "test"), "math": ("train", "test")}


FIXTURE_VERSION = 2  # bump when a writer changes what it writes


def write_hub_dataset(kind: str, root: Path, rows_per_split: dict[str, int] | int, seed: int = 0) -> Path:
    """The folder of `kind` (tldr, alpaca_farm, gsm8k, math) at root; rows_per_split: one count, or one per split."""
    sizes = rows_per_split if isinstance(rows_per_split, dict) else dict.fromkeys(SPLITS[kind], rows_per_split)
    return WRITERS[kind](Path(root), sizes, seed)


def recipe(kind: str, rows_per_split: dict[str, int] | int, seed: int = 0) -> dict:
    """What a written folder is a function of (kept beside it as fixture.json outside the repository's own files)."""
    return {"kind": kind, "rows": rows_per_split, "seed": seed, "version": FIXTURE_VERSION}


def corpus(kind: str, root: Path) -> list[dict]:
    """Every row of a folder written by write_hub_dataset, read back as plain records (to train stand-ins on)."""
    root = Path(root)
    if kind == "alpaca_farm":
        return [r for f in sorted((root / "alpaca_instructions").glob("*.json")) for r in json.loads(f.read_text())]
    folder = {"tldr": "data", "gsm8k": "main", "math": "data"}[kind]
    return [r for f in sorted((root / folder).glob("*.parquet")) for r in pd.read_parquet(f).to_dict("records")]
