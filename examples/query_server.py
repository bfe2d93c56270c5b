"""Query a running `vllm serve` of an Atom checkpoint through the OpenAI client.

    vllm serve CKPT --served-model-name atom --host 127.0.0.1 --port 8000 &
    python examples/query_server.py --base-url http://127.0.0.1:8000/v1 --model atom

Sends one completion and one chat completion and prints both.
"""

import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="atom")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")
    comp = client.completions.create(model=args.model, prompt=args.prompt,
                                     max_tokens=args.max_tokens, temperature=0)
    print("completion:", repr(comp.choices[0].text))
    chat = client.chat.completions.create(
        model=args.model, max_tokens=args.max_tokens, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of Germany? Answer in one sentence."}])
    print("chat:", repr(chat.choices[0].message.content))


if __name__ == "__main__":
    main()
