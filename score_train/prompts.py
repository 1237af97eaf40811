"""Prompts. The math and code texts are quoted from the SCoRe paper's appendix (Kumar et al. 2024);
the arithmetic ones are ours, kept short for small models.

Rollouts take user messages; the tokenizer's chat template wraps them. turn1_message() builds the
turn-1 user message of a record and self_correction_instruction() the turn-2 instruction p, which
never says whether y1 was right.

`ChatFormat` turns them into token ids through the tokenizer's chat template; the engine, the HF
baseline, pair-SFT and evaluation all build their ids here, so every path sees the same layout.
"""
from __future__ import annotations

MATH_TURN1 = (
    "You are a math expert. When you respond, respond only with the Solution of the final Problem, "
    "thinking step by step. At the end of the Solution, when you give your final answer, write it in the "
    'form "Final Answer: The final answer is $answer$. I hope it is correct."'
)

MATH_SELF_CORRECT = (
    "There might be an error in the solution above because of lack of understanding of the question. "
    "Please correct the error, if any, and rewrite the solution. Only output the final solution! At the "
    "end of the Solution, when you give your final answer, write it in the form \"Final Answer: The final "
    "answer is $answer$. I hope it is correct.\""
)

CODE_SELF_CORRECT = (
    "# There might be an error in the code above because of lack of understanding of the question. "
    "Please correct the error, if any, and rewrite the solution. Only output the final correct Python "
    "program!"
)

CODE_TURN1 = "Complete the following Python function. Output the whole function in a ```python code block.\n\n```python\n{prompt}```"

# Arithmetic: the question itself (the record's problem, "What is 37 + 45?") is the turn-1 message.
ARITHMETIC_SELF_CORRECT = (
    "There might be an error in the answer above. Please check it, correct the error if there is one, "
    "and give the final answer."
)

# Styles for arithmetic: "plain" (default) sends the bare question; "paper" uses the math prompts.
ARITHMETIC_STYLES = ("plain", "paper")


def turn1_message(record, style: str = "plain") -> str:
    """The user message of turn 1 for a data.Record."""
    kind = record.kind
    if kind == "code":
        return CODE_TURN1.format(prompt=record.problem)
    if kind == "math" or (kind == "arithmetic" and style == "paper"):
        return f"{MATH_TURN1}\n\nProblem:\n{record.problem}"
    if kind == "arithmetic":
        if style not in ARITHMETIC_STYLES:
            raise ValueError(f"style must be one of {ARITHMETIC_STYLES}, got {style!r}")
        return record.problem
    raise ValueError(f"unknown record kind {kind!r}")


def self_correction_instruction(kind: str, style: str = "plain", given: str = "") -> str:
    """The message after each turn but the last: given (rollout.instruction) when set, else the task's own."""
    if given:
        return given
    if kind == "code":
        return CODE_SELF_CORRECT
    if kind == "math" or (kind == "arithmetic" and style == "paper"):
        return MATH_SELF_CORRECT
    if kind == "arithmetic":
        return ARITHMETIC_SELF_CORRECT
    raise ValueError(f"unknown task kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# Chat formatting: token ids for the prompt and for what comes between two turns

_PLACEHOLDER = "PLACEHOLDER"


def _ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


class ChatFormat:
    """Prompt ids and instruction ids from the tokenizer's chat template, as token ids.

    Instruction ids are found by templating [user x, assistant PLACEHOLDER, user instruction] and
    cutting the ids at the placeholder: what follows it is the template's end of turn, the user
    turn and the assistant header. When a turn already ended with that end-of-turn token, it is not
    repeated. Generated text is never re-tokenised. Turn k > 2 uses the same suffix (chat templates
    render every [assistant, user] boundary alike).
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._ph = _ids(tokenizer.encode(_PLACEHOLDER, add_special_tokens=False))
        self._suffix_cache: dict[tuple[str, str, str], list[int]] = {}

    def _template(self, messages, gen: bool) -> list[int]:
        return _ids(self.tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True))

    def prompt_ids(self, prompt: str) -> list[int]:
        return self._template([{"role": "user", "content": prompt}], True)

    def suffix_ids(self, prompt: str, instruction: str, reply_prefix: str = "") -> list[int]:
        """Everything the template puts after a turn's content, up to and including the next assistant header,
        then reply_prefix: fixed text the next reply starts with (the model continues it; it is context like the
        instruction, never trained, and not part of the turn's text)."""
        key = (prompt, instruction, reply_prefix)
        if key not in self._suffix_cache:
            head = self.prompt_ids(prompt)
            full = self._template([{"role": "user", "content": prompt},
                                   {"role": "assistant", "content": _PLACEHOLDER},
                                   {"role": "user", "content": instruction}], True)
            ph = self._ph
            if full[:len(head)] != head or full[len(head):len(head) + len(ph)] != ph:
                raise ValueError("the chat template does not render [user, assistant, user] as the prompt "
                                 "followed by the assistant's content; cannot build turn-2 ids")
            pre = _ids(self.tok.encode(reply_prefix, add_special_tokens=False)) if reply_prefix else []
            self._suffix_cache[key] = full[len(head) + len(ph):] + pre
        return self._suffix_cache[key]

    def suffixes(self, prompts: list[str], instruction: str | list[str],
                 reply_prefix: str | list[str] = "") -> list[list[int]]:
        """suffix_ids of each prompt; instruction and reply_prefix are one string for all prompts or a list with
        one per prompt (an instruction pool's draw)."""
        def each(v, name):
            if isinstance(v, str):
                return [v] * len(prompts)
            if len(v) != len(prompts):
                raise ValueError(f"{name}: a list needs one entry per prompt ({len(prompts)}), got {len(v)}")
            return list(v)
        return [self.suffix_ids(p, i, r) for p, i, r in zip(prompts, each(instruction, "instruction"),
                                                            each(reply_prefix, "reply_prefix"))]

    @staticmethod
    def instruction_ids(suffix: list[int], turn_ids: list[int], eos_ids) -> list[int]:
        """The ids between a turn and the next: the suffix, without its end-of-turn token when the turn
        already ended with it."""
        if turn_ids and suffix and turn_ids[-1] in eos_ids and turn_ids[-1] == suffix[0]:
            return suffix[1:]
        return list(suffix)


def eos_ids_of(model, tokenizer) -> set[int]:
    """Every id that ends a turn: the model's generation config, its config and the tokenizer's."""
    ids = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(model.config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return ids
