"""A character tokenizer for the tiny random models (96 ids: newline, printable ASCII, EOS)."""

from __future__ import annotations

CHARS = "\n" + "".join(chr(c) for c in range(32, 126))  # 95 characters
EOS = 95


class ToyTokenizer:
    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [CHARS.index(c) if c in CHARS else 1 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(CHARS[i] for i in ids if i < len(CHARS))

    def get_vocab(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(CHARS)} | {"<eos>": EOS}

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(t for t in tokens if t != "<eos>")


def toy_model(seed: int = 0):  # -> BaseModel
    from tiny import tiny_model

    m = tiny_model("llama", seed=seed)
    m.tokenizer = ToyTokenizer()
    m.eos_token_ids = (EOS,)
    return m


class ChatToyTokenizer(ToyTokenizer):
    """The toy character tokenizer with a chat template (`role: content` lines, then `assistant: `)."""

    chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: "

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = True, return_dict: bool = True) -> dict[str, list[int]]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self(text) if tokenize else text  # type: ignore[return-value]
