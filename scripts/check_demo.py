"""Fail (exit 1) unless the demo's adapter beat the base: held-out exact match higher, with the two Wilson 95%
intervals apart, and the held-out loss lower. Reads the eval.json that `lorakit train --compare` wrote."""
import json
import sys

from lorakit.train.evaluate import wilson


def main(path: str) -> int:
    ev = json.load(open(path))
    n, before, after = ev["n"], ev["before"], ev["after"]
    lo_after = wilson(after["accuracy"] * n, n)[0]
    hi_before = wilson(before["accuracy"] * n, n)[1]
    ok = lo_after > hi_before and after["loss"] < before["loss"]
    verdict = "improved" if ok else "DID NOT IMPROVE"
    print(f"demo check: exact match {before['accuracy']:.0%} -> {after['accuracy']:.0%} on {n} held-out rows "
          f"(adapter's interval from {lo_after:.0%}, base's up to {hi_before:.0%}), loss {before['loss']:.4f} -> "
          f"{after['loss']:.4f}: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/eval.json"))
