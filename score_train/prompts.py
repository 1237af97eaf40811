"""Prompts. The math and code texts are quoted from the SCoRe paper's appendix (Kumar et al. 2024);
the arithmetic ones are ours, kept short for small models.

Rollouts take user messages; the tokenizer's chat template wraps them. turn1_message() builds the
turn-1 user message of a record and self_correction_instruction() the turn-2 instruction p, which
never says whether y1 was right.
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


def self_correction_instruction(kind: str, style: str = "plain") -> str:
    if kind == "code":
        return CODE_SELF_CORRECT
    if kind == "math" or (kind == "arithmetic" and style == "paper"):
        return MATH_SELF_CORRECT
    if kind == "arithmetic":
        return ARITHMETIC_SELF_CORRECT
    raise ValueError(f"unknown task kind {kind!r}")
