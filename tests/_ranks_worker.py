"""Run under torchrun by tests/test_ranks.py: build a Llama from this rank's checkpoint and
generate from this rank's prompt, recording what happened in OUT/rank{N}.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/_ranks_worker.py SPEC.json

SPEC: ``{"ckpt": [dir per rank], "tokenizer": [path per rank], "prompt": [ids per rank],
"temperature": [per rank], "seed": [per rank], "out": DIR}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from llama3.generation import Llama


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    result: dict = {"rank": rank}
    try:
        llama = Llama.build(spec["ckpt"][rank], spec["tokenizer"][rank], max_seq_len=64, max_batch_size=1,
                            seed=spec["seed"][rank], device="cpu", dtype="float32", verbose=False)
        result["stage"] = "loaded"
        tokens, _ = llama.generate([spec["prompt"][rank]], max_gen_len=4,
                                   temperature=spec["temperature"][rank])
        result["stage"], result["tokens"] = "generated", tokens
    except Exception as exc:  # noqa: BLE001 - the test reads what happened
        result["error"], result["message"] = type(exc).__name__, str(exc)
    (Path(spec["out"]) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
