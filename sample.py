"""Sample text from a checkpoint that train.py wrote, streaming tokens as they come.

    python sample.py --out-dir out-shakespeare-char-cpu --prompt "ROMEO:" --max-new-tokens 300
    python sample.py --out-dir out --prompt @prompt.txt --temperature 0.8 --top-k 40 --num-samples 3
    python sample.py --out-dir out --temperature 0               # greedy
    python sample.py --out-dir out --draft-out-dir out-small --verbose   # speculative decoding
    python sample.py --out-dir out --attention-map attn.png --layer 0    # needs matplotlib
    python sample.py --init-from gpt2 --prompt "Hello, I'm a language model,"   # GPT-2's weights
    python sample.py --init-from gpt2 --draft-init-from distilgpt2 --temperature 0 --verbose
    python sample.py --out-dir out --prompts prompts.txt --max-new-tokens 40 --verbose  # many, batched

Errors (a missing or corrupt checkpoint, a character the vocabulary lacks, a bad flag)
are one line on stderr and exit code 2; --debug shows the traceback.
"""
import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import argparse
import json
import sys
import time
from pathlib import Path

from model.attention_plot import attention_maps, plot_attention
from model.chat import END, ChatTokenizer, render
from model.cli import HelpFormatter, OneLineParser, UserError, report
from model.generate import TextFollower, _check_stops, check_sampling, stream
from model.gpt import GPT
from model.pretrained import load_out_dir
from model.speculative import SpeculativeStats, speculative_stream
from tinygrad_lite import backend, cpu, ops_tier
from tinygrad_lite.functional import DEFAULT_TIER, TIERS

SEPARATOR = "\n---------------\n"  # between samples, as nanoGPT's sample.py


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out-dir", default="out-shakespeare-char-cpu", help="an out dir of train.py")
    p.add_argument("--init-from", default=None,
                   help="instead of --out-dir: an out dir, a GPT-2 folder (config.json + model.safetensors) or a "
                        "hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2)")
    p.add_argument("--prompt", default="\n", help="start text, or @file to read it from a file")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus: the smallest set with mass >= p")
    p.add_argument("--seed", type=int, default=1337, help="sample i uses seed + i")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole context every step (slow reference)")
    p.add_argument("--device", default=None, help="cpu, cuda or strict (default: TINYGRAD_LITE_DEVICE or cpu)")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--draft-out-dir", default=None, help="a smaller checkpoint: speculative decoding")
    p.add_argument("--draft-init-from", default=None,
                   help="the draft as --init-from names it (e.g. distilgpt2 for a gpt2 target)")
    p.add_argument("--num-draft", type=int, default=4, help="tokens the draft proposes per round (k)")
    p.add_argument("--attention-map", default=None, metavar="PNG", help="plot one layer's attention heads")
    p.add_argument("--layer", type=int, default=0, help="the layer for --attention-map")
    p.add_argument("--ops", choices=list(TIERS), default=DEFAULT_TIER, help="which tier of the ops runs")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="many prompts, one per line (or JSONL: a string or {\"prompt\": ...} per line), run "
                        "through the serving engine as one workload (model/serving.py)")
    p.add_argument("--max-batch-size", type=int, default=16, help="with --prompts: sequences decoded together")
    p.add_argument("--chat", action="store_true",
                   help="talk to a chat checkpoint (from --stage sft or dpo): a line in, an answer out; EOF ends")
    p.add_argument("--verbose", action="store_true", help="prefill / decode tokens/s on stderr")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the checkpoint is read."""
    check_sampling(args.temperature, args.top_k, args.top_p)
    _check_stops(args.stop)
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.prompts and (args.chat or args.draft_out_dir or args.draft_init_from or args.attention_map or args.no_cache):
        raise UserError("--prompts runs the serving engine: it does not combine with --chat, a draft model, "
                        "--attention-map or --no-cache")
    if args.max_batch_size < 1:
        raise UserError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.num_draft < 1:
        raise UserError(f"--num-draft must be >= 1, got {args.num_draft}")
    if args.attention_map:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--attention-map needs matplotlib: pip install matplotlib") from None
        folder = Path(args.attention_map).parent
        if not folder.is_dir():  # fail now, not after all the samples were generated
            raise UserError(f"--attention-map: the folder {str(folder)!r} does not exist")


def read_prompt(prompt: str) -> str:
    """The prompt text; "@path" reads it from a UTF-8 file."""
    if not prompt.startswith("@"):
        return prompt
    path = Path(prompt[1:])
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompt file {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None


def load_model(out_dir: str | None, init_from: str | None = None):
    """(model in eval mode, tokenizer) on the default device: from `init_from` (an out dir,
    a GPT-2 folder or a hub name, model/pretrained.py) if given, else from out_dir."""
    model = GPT.from_pretrained(init_from) if init_from else load_out_dir(Path(out_dir))  # one-line errors
    if model.tokenizer is None:
        raise UserError(f"{init_from} has no tokenizer (no vocab.json and merges.txt beside its weights)")
    return model.eval(), model.tokenizer


def run(args: argparse.Namespace) -> None:
    check_args(args)
    if args.device:
        backend.set_default_device(args.device)  # before the model is built: its weights go there
    model, tokenizer = load_model(args.out_dir, args.init_from)
    if args.chat:
        return chat(model, tokenizer, args)
    if args.prompts:
        return run_prompts(model, tokenizer, args)
    n_layer = model.config.n_layer
    if args.attention_map and not -n_layer <= args.layer < n_layer:
        raise UserError(f"--layer must be in 0..{n_layer - 1} (or negative, from the end), got {args.layer}")
    draft = None
    if args.draft_out_dir or args.draft_init_from:
        draft, draft_tokenizer = load_model(args.draft_out_dir, args.draft_init_from)
        if draft_tokenizer.to_dict() != tokenizer.to_dict():
            raise UserError("the draft checkpoint uses a different tokenizer than the target")
    text = read_prompt(args.prompt)
    prompt = tokenizer.encode(text)  # ValueError for characters outside a char vocabulary
    if not prompt:  # the policy of model/generate.py: no silent default start token
        raise UserError("the prompt is empty: give --prompt at least one character (the default is '\\n')")

    out = sys.stdout
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    use_cache=not args.no_cache)
    first_sample = None
    for i in range(args.num_samples):
        seed = args.seed + i  # one seed per sample: reproducible, and the samples differ
        stats = SpeculativeStats()
        if draft is not None:
            tokens = speculative_stream(model, draft, prompt, args.max_new_tokens, num_draft=args.num_draft,
                                        seed=seed, stats=stats, **sampling)
        else:
            tokens = (ids[0] for ids in stream(model, prompt, args.max_new_tokens, seed=seed, **sampling))
        follower = TextFollower(tokenizer.decode, args.stop)
        out.write(text)
        out.flush()
        start, first = time.perf_counter(), None
        for token in tokens:
            first = first or time.perf_counter()
            out.write(follower.add(token))
            out.flush()
            if follower.stopped:
                break
        out.write(follower.finish() + (SEPARATOR if i + 1 < args.num_samples else "\n"))
        out.flush()
        end = time.perf_counter()
        if args.verbose:
            report_speed(len(prompt), len(follower.ids), start, first, end, stats if draft else None)
        if first_sample is None:
            first_sample = prompt + follower.kept_ids()

    if args.attention_map:
        ids = first_sample[-model.config.block_size:]
        maps = attention_maps(model, ids, args.layer)  # (n_head, T, T)
        labels = [tokenizer.decode([t]) for t in ids]
        plot_attention(maps, args.attention_map, labels, title=f"layer {args.layer}")
        print(f"attention map of layer {args.layer}: {args.attention_map}", file=sys.stderr)


def chat(model, tokenizer, args: argparse.Namespace) -> None:
    """The interactive loop: read a line, render the whole conversation in the chat template
    (model/chat.py), stream the answer until <|end|>, keep both in the conversation. Past
    block_size the model sees its last block_size tokens (the sliding window of generate.py).
    EOF (Ctrl-D) or Ctrl-C ends it."""
    if not isinstance(tokenizer, ChatTokenizer):
        raise UserError("--chat needs a chat checkpoint: fine-tune one with train.py --stage sft")
    end = tokenizer.special(END)
    messages, n = [], 0
    while True:
        print("you: ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:  # EOF
            print("", file=sys.stderr)
            return
        try:
            ids, _ = render(tokenizer, messages + [{"role": "user", "content": line.rstrip("\n")}],
                            add_generation_prompt=True)
        except ValueError as e:  # e.g. a character outside a char vocabulary: say so, go on
            print("error: " + " ".join(str(e).split()), file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        follower, answer = TextFollower(tokenizer.decode), []
        for step in stream(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed + n, use_cache=not args.no_cache):
            if step[0] == end:
                break
            answer.append(step[0])
            sys.stdout.write(follower.add(step[0]))
            sys.stdout.flush()
        sys.stdout.write(follower.finish() + "\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": tokenizer.decode(answer)})
        n += 1


def read_prompts(path: str) -> list[str]:
    """The prompts of a file: one per line, or JSONL (a JSON string or {"prompt": ...} per line)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompts file {path!r}: {getattr(e, 'strerror', None) or e}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not JSON: {e.msg}") from None
            item = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(item, str):
                raise UserError(f'{path}:{number}: expected a string or an object with a "prompt" string')
            line = item
        prompts.append(line)
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def run_prompts(model, tokenizer, args: argparse.Namespace) -> None:
    """Every prompt of --prompts (x --num-samples) through one Engine, as one workload:
    continuous batching over a paged, prefix-shared KV cache. Prints each prompt and its
    completion in file order; --verbose adds throughput, latency and the prefix hit rate."""
    from tqdm import tqdm

    from model.serving import Engine, latency_summary
    prompts = read_prompts(args.prompts)
    page_size = 16
    engine = Engine(model, args.max_batch_size, page_size, args.max_batch_size * -(-model.config.block_size // page_size),
                    tokenizer=tokenizer, max_step_tokens=max(512, args.max_batch_size))
    rids, texts = [], []
    for number, text in enumerate(prompts, 1):
        try:
            ids = tokenizer.encode(text)
            for i in range(args.num_samples):
                rids.append(engine.submit(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                          top_p=args.top_p, seed=args.seed + len(rids), stop=args.stop))
                texts.append(text)
        except ValueError as e:  # (RequestError, or a character the vocabulary lacks)
            raise UserError(f"{args.prompts}, prompt {number}: {e}") from None
    start = time.perf_counter()
    # a bar of finished requests, on a terminal only (disable=None): stdout is the texts
    with tqdm(total=len(rids), unit="request", file=sys.stderr, disable=None, leave=False) as bar:
        while engine.has_work():
            bar.update(sum(engine.request(rid).done for rid in engine.step()))
    end = time.perf_counter()
    for i, (rid, text) in enumerate(zip(rids, texts)):
        sys.stdout.write(text + engine.request(rid).text + (SEPARATOR if i + 1 < len(rids) else "\n"))
    sys.stdout.flush()
    if args.verbose:
        requests = [engine.request(rid) for rid in rids]
        got = latency_summary(requests, end - start)
        prompt_tokens = sum(len(r.prompt) for r in requests)
        print(f"{len(requests)} requests, {got['generated_tokens']} tokens in {end - start:.2f} s: "
              f"{got['tokens_per_s']:,.0f} tokens/s; time to first token p50 {got['ttft_ms_p50']:.0f} ms, "
              f"p99 {got['ttft_ms_p99']:.0f} ms; per token p50 {got['tpot_ms_p50']:.1f} ms, p99 "
              f"{got['tpot_ms_p99']:.1f} ms; prefix cache: {engine.prefix_hit_tokens} of {prompt_tokens} prompt "
              f"tokens ({engine.prefix_hit_tokens / prompt_tokens:.0%})", file=sys.stderr)


def report_speed(n_prompt: int, n_new: int, start: float, first: float | None, end: float, stats) -> None:
    """Prefill speed: prompt tokens / time to the first new token; decode: the rest."""
    if first is None:
        print(f"prefill: no tokens generated ({n_prompt} prompt tokens)", file=sys.stderr)
        return
    line = f"prefill: {n_prompt / max(first - start, 1e-9):,.0f} tokens/s ({n_prompt} tokens)"
    if n_new > 1:
        line += f"; decode: {(n_new - 1) / max(end - first, 1e-9):,.1f} tokens/s ({n_new - 1} tokens)"
    print(line, file=sys.stderr)
    if stats is not None:
        print(f"speculative: {stats}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cpu.tune()  # this process's malloc and threads (tinygrad_lite/cpu.py)
        with ops_tier(args.ops):
            run(args)
        return 0
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `python sample.py | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as e:
        return report(e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
