"""The `minideploy` command, shaped like `lmdeploy`."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys

from .config import EngineConfig, GenerationConfig


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_path", nargs="?", default="default",
                   help="HF model directory, .gguf file, or 'default' (built-in SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--session-len", type=int, default=None,
                   help="longest conversation in tokens (default: the model's context length)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree: processes on CPU (gloo), GPUs on CUDA (NCCL)")
    p.add_argument("--eager-mode", action="store_true",
                   help="GPU: run decode steps eagerly instead of replaying CUDA graphs")
    p.add_argument("--lm-head-int8", action="store_true",
                   help="hold the LM head in int8, one scale per row (faster decode on a CPU)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (turns sampling on)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (turns sampling on)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (turns sampling on)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def engine_config(args) -> EngineConfig:
    return EngineConfig(dtype=args.dtype, device=args.device, session_len=args.session_len, tp=args.tp,
                        eager_mode=args.eager_mode, lm_head_int8=args.lm_head_int8)


def gen_config(args) -> GenerationConfig:
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                  ("top_k", args.top_k)) if v is not None}
    return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=bool(sampling),
                            repetition_penalty=args.repetition_penalty, random_seed=args.seed,
                            **sampling)


def read_turns(stream):
    """User turns: one per line; a prompt is shown only when a person is typing."""
    interactive = stream.isatty()
    while True:
        if interactive:
            print("\nuser> ", end="", flush=True)
        line = stream.readline()
        if not line:
            return
        yield line.strip()


def cmd_chat(args) -> int:
    from .engine import Pipeline

    pipe = Pipeline(args.model_path, engine_config(args))
    config = gen_config(args)
    print(f"model: {pipe.loaded.source.path}  session_len: {pipe.session_len}  "
          "(type 'end' to reset the session, 'exit' to quit)", file=sys.stderr)
    history: list[dict] = []
    for turn in read_turns(sys.stdin):
        if turn == "exit":
            break
        if turn == "end":
            history = []
            pipe.end_session(0)
            print("(session reset)", file=sys.stderr)
            continue
        if not turn:
            continue
        messages = history + [{"role": "user", "content": turn}]
        try:
            reply = ""
            print("assistant> ", end="", flush=True)
            for chunk in pipe.chat(messages, config, session_id=0):  # prefills only the new turn
                print(chunk.text, end="", flush=True)
                reply += chunk.text
        except ValueError as err:  # e.g. the conversation no longer fits session_len
            print(f"\nerror: {err}. Type 'end' to start a new session.", file=sys.stderr)
            continue
        print(flush=True)
        history = messages + [{"role": "assistant", "content": reply}]
    return 0


def cmd_generate(args) -> int:
    from .engine import Pipeline

    pipe = Pipeline(args.model_path, engine_config(args))
    response, total, decode_tps = pipe.generate_timed(args.prompt, gen_config(args))
    print(response.text)
    print(f"[{response.input_token_len} prompt tokens, {response.generate_token_len} generated "
          f"({response.finish_reason}) in {total:.2f} s; decode {decode_tps:.1f} tokens/s on "
          f"{pipe.device.type}, {pipe.engine_config.torch_dtype()}]", file=sys.stderr)
    return 0


def cmd_auto_awq(args) -> int:
    from .quant.lite import auto_awq

    out = auto_awq(args.model_path, args.work_dir, args.w_bits, args.w_group_size, args.calib_samples,
                   args.calib_seqlen, args.calib_dataset, args.search_samples, args.device)
    print(f"wrote {out} (W{args.w_bits} g{args.w_group_size}); run: minideploy chat {out}")
    return 0


def cmd_convert(args) -> int:
    from .parallel import convert

    out = convert(args.model_path, args.dst_path, args.tp, args.dtype)
    print(f"wrote {out} (tp={args.tp}, {args.dtype}); run: minideploy chat {out} --tp {args.tp}")
    return 0


def serve_module(name: str, extra: str):
    """A minideploy.serve module; a missing extra is a message saying what to install."""
    try:
        return importlib.import_module(f".serve.{name}", __package__)
    except ModuleNotFoundError as err:
        raise ValueError(f"{err.msg}: pip install 'minideploy[{extra}]'") from None


def cmd_api_server(args) -> int:
    config = dataclasses.replace(engine_config(args), max_batch_size=args.max_batch_size,
                                 cache_max_entry_count=args.cache_max_entry_count,
                                 quant_policy=args.quant_policy)
    return serve_module("api_server", "serve").run_api_server(
        args.model_path, config, args.server_name, args.server_port, args.api_keys or (), args.model_name,
        args.log_level)


def cmd_api_client(args) -> int:
    return serve_module("api_client", "serve").run_api_client(args.api_server_url, args.api_key)


def cmd_gradio(args) -> int:
    return serve_module("gradio_app", "webui").run_gradio(args.api_server_url, args.server_name,
                                                          args.server_port, args.api_key)


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible API server, terminal client, web UI")
    serve_sub = serve.add_subparsers(dest="serve_command", required=True, metavar="COMMAND")
    api = serve_sub.add_parser("api_server", help="serve a model over an OpenAI-compatible HTTP API")
    add_model_args(api)
    api.add_argument("--server-name", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    api.add_argument("--server-port", type=int, default=23333)
    api.add_argument("--max-batch-size", "--instance-num", dest="max_batch_size", type=int, default=64,
                     help="most sequences decoded together (--instance-num: LMDeploy's older name)")
    api.add_argument("--cache-max-entry-count", type=float, default=0.8,
                     help="KV cache: fraction of free memory (< 1) or number of blocks (>= 1)")
    api.add_argument("--quant-policy", type=int, default=0, choices=[0, 4, 8], help="KV-cache int4/int8")
    api.add_argument("--api-keys", nargs="+", default=None, help="accept only requests bearing one of these")
    api.add_argument("--model-name", default=None, help="the name clients ask for (default: the path's name)")
    api.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    api.set_defaults(func=cmd_api_server)
    for name, func, help_ in (("api_client", cmd_api_client, "multi-turn chat in the terminal over HTTP"),
                              ("gradio", cmd_gradio, "a web chat UI in front of an api_server")):
        p = serve_sub.add_parser(name, help=help_)
        p.add_argument("api_server_url", help="e.g. http://127.0.0.1:23333")
        p.add_argument("--api-key", default=None)
        if name == "gradio":
            p.add_argument("--server-name", default="127.0.0.1")
            p.add_argument("--server-port", type=int, default=6006)
        p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minideploy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", help="interactive multi-turn chat in the terminal (streams)")
    add_model_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    gen = sub.add_parser("generate", help="answer one prompt and report tokens/s")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--prompt", "-p", required=True)
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="split a model for --tp N into a workspace (TurboMind tensor names)")
    conv.add_argument("model_path", help="HF model directory (float or AWQ), .gguf file, or 'default'")
    conv.add_argument("--dst-path", default="./workspace", help="the workspace directory to write")
    conv.add_argument("--tp", type=int, default=1, help="tensor-parallel degree the workspace is split for")
    conv.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                      help="dtype of the stored float tensors")
    conv.set_defaults(func=cmd_convert)

    lite = sub.add_parser("lite", help="quantization (LMDeploy's `lite`)")
    lite_sub = lite.add_subparsers(dest="lite_command", required=True, metavar="COMMAND")
    awq = lite_sub.add_parser("auto_awq", help="AWQ weight-only quantization → an AutoAWQ-format checkpoint")
    awq.add_argument("model_path", help="HF model directory, .gguf file, or 'default'")
    awq.add_argument("--work-dir", required=True, help="where the quantized checkpoint is written")
    awq.add_argument("--w-bits", type=int, default=4, choices=[3, 4])
    awq.add_argument("--w-group-size", type=int, default=128,
                     help="input features per scale/zero (the default model needs 64 or 32: 576 = 9·64)")
    awq.add_argument("--calib-samples", type=int, default=128)
    awq.add_argument("--calib-seqlen", type=int, default=512)
    awq.add_argument("--calib-dataset", default=None,
                     help="a UTF-8 text file (default: the calibration split of pydoc_data.topics)")
    awq.add_argument("--search-samples", type=int, default=16,
                     help="calibration sequences that score each scale/clip candidate (statistics use all)")
    awq.add_argument("--device", default="cpu", help="cpu or cuda[:N] (calibration runs in float32)")
    awq.set_defaults(func=cmd_auto_awq)
    add_serve_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Say what slow one-time steps (model conversion, kernel builds) are doing.
    logging.basicConfig(format="minideploy: %(message)s", level=logging.WARNING)
    logging.getLogger("minideploy").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"minideploy {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
