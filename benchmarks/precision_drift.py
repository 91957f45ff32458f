"""How far reduced precision moves the results: two outputs of the same images, compared row by row.

    python benchmarks/precision_drift.py FLOAT32_OUTPUT REDUCED_OUTPUT

Top-1 agreement, the overlap of the top-5 sets, and the embeddings' cosine similarity and relative L2 error, over
the images both outputs labeled.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from pipeline.query import connect, fetch_arrow


def rows(output: str) -> dict[str, dict]:
    with connect(output) as db:
        table = fetch_arrow(db, "SELECT image_id, class_id, top_k, embedding FROM latest WHERE status = 'ok'")
    return {row["image_id"].rsplit("/", 1)[-1]: row for row in table.to_pylist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference")
    parser.add_argument("reduced")
    args = parser.parse_args()
    a, b = rows(args.reference), rows(args.reduced)
    common = sorted(a.keys() & b.keys())
    top1 = np.mean([a[i]["class_id"] == b[i]["class_id"] for i in common])
    overlap = np.mean(
        [len({t["class_id"] for t in a[i]["top_k"]} & {t["class_id"] for t in b[i]["top_k"]}) / 5 for i in common]
    )
    x = np.array([a[i]["embedding"] for i in common], np.float64)
    y = np.array([b[i]["embedding"] for i in common], np.float64)
    cosine = np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    relative = np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1)
    scores = np.array([a[i]["top_k"][0]["score"] for i in common])
    print(
        json.dumps(
            {
                "images": len(common),
                "top1_agreement": round(float(top1), 4),
                "top5_overlap": round(float(overlap), 4),
                "embedding_cosine_min": round(float(cosine.min()), 5),
                "embedding_cosine_mean": round(float(cosine.mean()), 5),
                "embedding_relative_l2_mean": round(float(relative.mean()), 4),
                "embedding_relative_l2_max": round(float(relative.max()), 4),
                "reference_top1_score_median": round(float(np.median(scores)), 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
