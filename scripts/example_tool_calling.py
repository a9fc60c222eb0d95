"""Tool calling with a Llama 3.1+ instruct model: a custom tool, the model's call, its result, the answer.

    python scripts/example_tool_calling.py CKPT_DIR [--tokenizer_path PATH] [--tool_format json]
    torchrun --nproc_per_node N scripts/example_tool_calling.py CKPT_DIR

The script defines one custom tool (``get_weather``), describes it to the model in Meta's
documented prompt format (``--tool_format json`` or ``function_tag`` for Llama 3.1 / 3.3,
``python_list`` for Llama 3.2), and asks a question. If the model calls the tool, the script runs
its own Python function for it (the weather is made up), sends the result back as an ``ipython``
message and prints the final answer. Nothing the model writes is executed. A random-weight test
checkpoint runs too; it just will not call the tool. Every rank runs the model; rank 0 prints.
"""

from __future__ import annotations

from llama3.programs import quiet_interrupts, run_program

if __name__ == "__main__":
    quiet_interrupts()  # first: Ctrl-C while the imports below run ends quietly (status 130)

import json
from datetime import date
from typing import Any

try:  # outside the venv: a one-line hint, not a traceback (see _env.py)
    import _env  # noqa: F401
except ModuleNotFoundError:  # loaded by path from elsewhere (a test): nothing to check
    pass

from llama3.chat_format import (
    TOOL_PROMPT_FORMATS,
    Message,
    ToolCall,
    ToolDefinition,
    ToolParameter,
    builtin_tools_system_prompt,
    format_tool_call,
    function_tag_tools_prompt,
    json_tools_prompt,
    python_list_tools_prompt,
)
from llama3.cli import UsageError, build_llama, fire_strict
from llama3.progress import is_rank_zero
from llama3.tool_session import as_assistant_message

GET_WEATHER = ToolDefinition(
    name="get_weather",
    description="Get the current weather in a city",
    parameters={
        "city": ToolParameter("string", "The name of the city, e.g. San Francisco"),
        "unit": ToolParameter("string", "celsius or fahrenheit", required=False, default="celsius"),
    },
)


def get_weather(city: str, unit: str = "celsius") -> dict[str, Any]:
    """The tool itself: a stand-in that makes up the weather."""
    temperature = 21 if unit == "celsius" else 70
    return {"city": city, "temperature": temperature, "unit": unit, "sky": "sunny"}


def run_tool(call: ToolCall) -> str:
    """Run one of *our* tools for a call the model made; bad calls get an error result."""
    if call["tool_name"] != GET_WEATHER.name:
        return json.dumps({"error": f"unknown tool {call['tool_name']!r}"})
    try:
        return json.dumps(get_weather(**call["arguments"]))
    except TypeError as e:  # missing or unexpected arguments
        return json.dumps({"error": str(e)})


def build_dialog(question: str, tool_format: str) -> list[Message]:
    """The documented layout: 3.1 formats put the tools in a user message after an
    ``Environment: ipython`` system prompt; the 3.2 Python-list format puts them in the system prompt."""
    if tool_format == "python_list":
        return [
            {"role": "system", "content": python_list_tools_prompt([GET_WEATHER])},
            {"role": "user", "content": question},
        ]
    tools = json_tools_prompt if tool_format == "json" else function_tag_tools_prompt
    system = builtin_tools_system_prompt(today=date.today(), instructions="You are a helpful assistant.")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": tools([GET_WEATHER])},
        {"role": "user", "content": question},
    ]


def main(
    ckpt_dir: str,
    tokenizer_path: str | None = None,
    question: str = "What is the weather like in Paris right now?",
    tool_format: str = "json",
    temperature: float = 0.0,
    top_p: float = 0.9,
    max_seq_len: int = 2048,
    max_gen_len: int = 256,
    max_tool_rounds: int = 3,
    model_parallel_size: int | None = None,
    seed: int = 1,
    device: str | None = None,
    dtype: str | None = None,
    rope_scale_factor: float | None = None,
    compile: bool = False,
    warm_up: bool = False,
    quantize: str | None = None,
) -> None:
    """Ask ``question`` with the get_weather tool available and print every step.

    Args:
        ckpt_dir: checkpoint directory of a Llama 3.1+ instruct model (Meta or Hugging Face format).
        tokenizer_path: Meta's tokenizer.model (default: found beside the checkpoint).
        question: the user's question.
        tool_format: how the tool is described and called: json, function_tag or python_list (3.2).
        temperature: sampling temperature; 0 is greedy decoding.
        top_p: nucleus (top-p) sampling threshold, in (0, 1].
        max_seq_len: context length (prompt + answers) to allocate the KV cache for.
        max_gen_len: the most new tokens per reply.
        max_tool_rounds: tool calls answered before giving up on a final answer.
        model_parallel_size: ranks to split the model across (default: every torchrun process).
        seed: random seed, the same on every rank.
        device: cuda, mps or cpu (default: the best available).
        dtype: bfloat16, float16 or float32 (default: the device's preferred one).
        rope_scale_factor: override the Llama 3.1+ RoPE scaling factor (32 for Llama 3.2).
        compile: decode with torch.compile.
        warm_up: with --compile, compile every context-length bucket at start-up (logged, with times).
        quantize: "int8", "w8a8" (CPU), "fp8" or "int4" to quantize a bf16 checkpoint at load
            (a quantized checkpoint is recognised by itself).
    """
    if tool_format not in TOOL_PROMPT_FORMATS:
        raise UsageError(f"--tool_format must be one of {', '.join(TOOL_PROMPT_FORMATS)}, "
                         f"got {tool_format!r}")
    generator, temperature, top_p = build_llama(
        ckpt_dir, tokenizer_path, temperature=temperature, top_p=top_p, max_seq_len=max_seq_len,
        max_batch_size=1, model_parallel_size=model_parallel_size, seed=seed, device=device, dtype=dtype,
        rope_scale_factor=rope_scale_factor, compile=compile, warm_up=warm_up, quantize=quantize)
    show = print if is_rank_zero() else (lambda *a, **k: None)
    dialog = build_dialog(question, tool_format)
    for message in dialog:
        show(f"--- {message['role']}\n{message['content']}\n")
    for _ in range(max_tool_rounds):
        generation = generator.chat_completion([dialog], temperature=temperature, top_p=top_p,
                                               max_gen_len=max_gen_len)[0]["generation"]
        reply = as_assistant_message(generator, generation)
        dialog.append(reply)
        if not reply["tool_calls"]:
            show(f"--- assistant (final answer)\n{reply['content']}")
            return
        for call in reply["tool_calls"]:
            show(f"--- assistant calls {call['tool_name']} with {json.dumps(call['arguments'])}")
            show(f"    (written as: {format_tool_call(call, tool_format)})")  # type: ignore[arg-type]
            result = run_tool(call)
            show(f"--- ipython (our tool's result)\n{result}\n")
            dialog.append({"role": "ipython", "content": result})
    show(f"--- stopped after {max_tool_rounds} rounds of tool calls")


if __name__ == "__main__":
    run_program(lambda: fire_strict(main))
