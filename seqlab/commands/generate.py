"""seqlab generate: stream text from a checkpoint (or a randomly initialised preset) with the byte tokenizer
(or, with ``--tokenizer DIR``, a local Hugging Face tokenizer.json; ``--checkpoint`` also reads a transformers
checkpoint directory of an architecture ``seqlab.interop`` supports).

    seqlab generate --checkpoint runs/mamba --prompt "Once upon a time" --max-new-tokens 200
    seqlab generate --preset mamba --size tiny --prompt hi --max-new-tokens 5        # random weights: smoke run
    seqlab generate --checkpoint runs/mamba --prompt "Hello" --save-state chat.safetensors
    seqlab generate --checkpoint runs/mamba --prompt " and then" --resume-state chat.safetensors
    seqlab generate --checkpoint hf/mamba-130m --tokenizer hf/mamba-130m --prompt "The" --temperature 0

The prompt is echoed, then the continuation is written to stdout as it is produced; a summary line
(tokens, seconds, tokens/s, state bytes) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

HELP = "generate text from a checkpoint or preset, streamed to stdout"


def register(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint", metavar="DIR", help="directory written by model.save, or a `seqlab train --out` directory"
    )
    source.add_argument("--preset", metavar="NAME", help="a preset with random weights (smoke runs), e.g. mamba")
    parser.add_argument("--size", default="tiny", help="preset size (with --preset; default: tiny)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from the BOS token)")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K")
    parser.add_argument("--top-p", type=float, default=None, metavar="P")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (and random weights with --preset)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "fp32", "bf16"),
        help="compute dtype (autocast; weights stay fp32). auto = bf16 on cuda, fp32 on cpu",
    )
    parser.add_argument("--save-state", metavar="FILE", help="save the inference state after generating")
    parser.add_argument("--resume-state", metavar="FILE", help="continue from a state saved with --save-state")
    parser.add_argument("--no-stop", action="store_true", help="keep generating after the EOS token")
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer (DIR/tokenizer.json); default: bytes"
    )


def _load_model(args, torch):
    from seqlab.errors import ConfigError

    if args.checkpoint is None and args.preset is None:
        raise ConfigError("generate: pass --checkpoint DIR (a trained model) or --preset NAME (random weights)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda was requested but no CUDA device is available; use --device cpu")
    if args.checkpoint is not None:
        from pathlib import Path

        from seqlab.models.language_model import LanguageModel

        directory = Path(args.checkpoint)
        if not (directory / "config.json").exists() and (directory / "checkpoint" / "config.json").exists():
            directory = directory / "checkpoint"  # a `seqlab train --out DIR` run directory
        from seqlab.interop.hf import is_hf_checkpoint

        if is_hf_checkpoint(directory):
            return LanguageModel.from_hf(directory, device=args.device)
        return LanguageModel.load(directory, device=args.device)
    from seqlab.models.presets import from_preset

    torch.manual_seed(0 if args.seed is None else args.seed)
    with torch.device(args.device):
        return from_preset(args.preset, args.size)


def run(args: argparse.Namespace) -> int:
    import torch

    from seqlab.commands.train import check_output_file
    from seqlab.errors import ConfigError
    from seqlab.generation import generate
    from seqlab.models.state import InferenceState
    from seqlab.tokenizer import ByteTokenizer

    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens: expected >= 0, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature: expected a number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k: expected an integer >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p: expected a number in (0, 1], got {args.top_p}")
    check_output_file(args.save_state, "--save-state")  # before generating, not after
    model = _load_model(args, torch)
    if args.tokenizer is not None:
        from seqlab.interop.hf_tokenizer import HFTokenizer

        tokenizer = HFTokenizer(args.tokenizer)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"--tokenizer: it has {tokenizer.vocab_size} tokens, the model's vocabulary only "
                f"{model.config.vocab_size}; pass the tokenizer the checkpoint was trained with"
            )
    else:
        tokenizer = ByteTokenizer()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"generate: the model's vocabulary has {model.config.vocab_size} tokens, the byte tokenizer needs "
            f"{tokenizer.vocab_size}; pass --tokenizer DIR if the model has its own tokenizer (a synthetic-task "
            "checkpoint cannot generate text)"
        )
    prompt_ids = tokenizer.encode(args.prompt)
    if args.resume_state is None and not prompt_ids:
        if tokenizer.bos_id is None:
            raise ConfigError("--prompt: this tokenizer has no BOS token to start from; pass a non-empty prompt")
        prompt_ids = [tokenizer.bos_id]
    if not prompt_ids:
        raise ConfigError("--prompt: resuming a state needs a non-empty prompt to continue with")
    total = len(prompt_ids) + args.max_new_tokens

    state = None
    if args.resume_state is not None:
        offset = int(InferenceState.file_metadata(args.resume_state).get("offset", 0))
        state = InferenceState.load(args.resume_state, model, max_seqlen=offset + total, device=args.device)
    elif args.save_state is not None:
        state = model.allocate_state(1, total)

    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    decoder = tokenizer.stream_decoder()
    decoder.push(prompt_ids)  # context only (already echoed): subword tokenizers space the continuation by it
    count = 0

    def on_token(step: int, token: torch.Tensor) -> None:
        nonlocal count
        count += 1
        text = decoder.push(int(token[0]))
        if text:
            out.write(text)
            out.flush()

    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and args.device == "cuda")
    start = time.perf_counter()
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=use_bf16):
        generate(
            model,
            [prompt_ids],
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            on_token=on_token,
            eos_id=None if args.no_stop else tokenizer.eos_id,
            state=state,
        )
    seconds = time.perf_counter() - start
    out.write(decoder.flush() + "\n")
    out.flush()
    if state is not None and args.save_state is not None:
        state.save(args.save_state)
    state_bytes = model.state_bytes(1, total) if state is None else state.nbytes()
    print(
        f"[seqlab generate] {count} tokens in {seconds:.2f} s ({count / max(seconds, 1e-9):.1f} tokens/s), "
        f"state {state_bytes / 1e6:.2f} MB" + (f", saved to {args.save_state}" if args.save_state else ""),
        file=sys.stderr,
    )
    return 0
