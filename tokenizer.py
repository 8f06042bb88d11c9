"""Tokenizers: a checkpoint's `tokenizer.json` with the ids the sampler needs and a chat formatter, and the
word-level tokenizer of the tiny default model (model.tiny_config).

    tok = load_tokenizer(folder)                  # a Hugging Face folder, as model.load_model reads it
    ids = tok.encode(tok.chat(question), special=False)

Choices that are ours:
1. No jinja is run: the chat format (ChatML, Llama-3 or none) is read off the chat template's special
   tokens and the default system prompt off its text; Tokenizer.chat writes what transformers'
   apply_chat_template renders for one user turn.
2. End ids are gathered from generation_config.json, config.json and tokenizer_config.json, all of
   them; padding falls back to the first end id.
3. The tiny default model's tokenizer (build_tokenizer) is word-level, built with the `tokenizers`
   library for the embedded domain's closed vocabulary, and saved as tokenizer.json like any other,
   so it goes through the same save / load path as a real checkpoint.
"""

import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers

from model import CheckpointError, read_json


# ---- a checkpoint's tokenizer ----

LLAMA3_SYSTEM = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"  # the template's default


class Tokenizer:
    """A `tokenizers.Tokenizer` with the ids the sampler needs and a chat formatter without jinja.

    chat_format: "chatml" (Qwen, SmolLM2: <|im_start|>role\\n...<|im_end|>), "llama3" (header tokens),
    or None (base models: plain text). It is read off the chat template's special tokens, and the
    default system prompt off the template's text (chatml_system); no jinja is run.
    """

    def __init__(self, tok: HFTokenizer, eos_ids, pad_id, chat_format=None, system=None, files=None):
        self.tok, self.eos_ids, self.pad_id = tok, list(eos_ids), pad_id
        self.chat_format, self.system = chat_format, system
        self.files = files or {}  # tokenizer_config.json etc., written back unchanged by save()

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """special: add the tokenizer's own special tokens (Llama-3's BOS), as transformers does."""
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def chat(self, prompt: str, system: str | None = None) -> str:
        """One user turn in the checkpoint's chat format, ending where the assistant's reply begins:
        what transformers' apply_chat_template renders for [system?, user] with add_generation_prompt.
        system=None: the template's default system prompt; "": none. Encode the result with
        special=False: the text already holds its special tokens."""
        if self.chat_format == "chatml":
            system = system if system is not None else self.system
            head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
            return f"{head}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        if self.chat_format == "llama3":  # the template trims each message; 3.1+ always writes its dated system block
            h = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
            system = (self.system or "") + (system or "").strip()
            head = f"{h('system')}{system}<|eot_id|>" if system else ""
            return f"<|begin_of_text|>{head}{h('user')}{prompt.strip()}<|eot_id|>{h('assistant')}"
        return prompt

    def save(self, path):
        """tokenizer.json and the files it was loaded with (tokenizer_config.json, chat_template.jinja, ...)."""
        path = Path(path)
        self.tok.save(str(path / "tokenizer.json"))
        for name, d in self.files.items():
            (path / name).write_text(d if isinstance(d, str) else json.dumps(d, indent=2) + "\n")


def _token_id(tok: HFTokenizer, t):
    if isinstance(t, dict):
        t = t.get("content")
    return tok.token_to_id(t) if isinstance(t, str) else None


def load_tokenizer(path) -> Tokenizer:
    """tokenizer.json through `tokenizers`, with the end and padding ids (end_ids) and the chat format
    (chat_format) of the folder's other files."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no tokenizer.json (only fast tokenizers saved as tokenizer.json are supported)")
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as e:
        raise CheckpointError(f"{file}: cannot be read by tokenizers ({e})") from None
    files = {n: read_json(path / n)
             for n in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
             if (path / n).is_file()}
    if (path / "chat_template.jinja").is_file():  # transformers 5 writes the template on its own
        files["chat_template.jinja"] = (path / "chat_template.jinja").read_text()
    mcfg = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    eos, pad = end_ids(tok, files, mcfg)
    return Tokenizer(tok, eos, pad, *chat_format(files), files)


def end_ids(tok: HFTokenizer, files: dict, mcfg: dict) -> tuple[list[int], int]:
    """eos ids from generation_config.json, config.json (mcfg) and tokenizer_config.json, all of them in that
    order (choice 2); the pad id from tokenizer_config.json, else config.json, else the first eos id."""
    tcfg, gen = files.get("tokenizer_config.json", {}), files.get("generation_config.json", {})
    eos = []
    for e in (gen.get("eos_token_id"), mcfg.get("eos_token_id"), _token_id(tok, tcfg.get("eos_token"))):
        for i in (e if isinstance(e, list) else [e]):
            if isinstance(i, int) and i not in eos:
                eos.append(i)
    pad = _token_id(tok, tcfg.get("pad_token"))
    pad = pad if pad is not None else mcfg.get("pad_token_id")
    return eos, pad if isinstance(pad, int) else (eos[0] if eos else 0)


def chat_format(files: dict) -> tuple[str | None, str | None]:
    """(chat format, default system prompt) read off the chat template's text (choice 1)."""
    template = files.get("chat_template.jinja") or files.get("tokenizer_config.json", {}).get("chat_template") or ""
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    if "<|im_start|>" in template:
        return "chatml", chatml_system(template)
    if "<|start_header_id|>" in template:
        return "llama3", (LLAMA3_SYSTEM if "Cutting Knowledge Date" in template else None)
    return None, None


def chatml_system(template: str) -> str | None:
    """The default system prompt of a ChatML template: the text of a string literal in it that reads
    '<|im_start|>system' newline ... '<|im_end|>', its newlines written as \\n (Qwen2.5's template
    in JSON) or as real newlines (SmolLM2's). A literal that stops before <|im_end|> (the branch that
    writes the caller's system message: '...system\\n' + messages[0]['content'] + ...) is no default."""
    m = re.search(r"""'<\|im_start\|>system(?:\\n|\n)([^']*?)<\|im_end\|>|"""
                  r'"<\|im_start\|>system(?:\\n|\n)([^"]*?)<\|im_end\|>',
                  template)
    return (m.group(1) if m.group(1) is not None else m.group(2)).replace("\\n", "\n") if m else None


# ---- the tiny default model's tokenizer ----

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|unk|>"]


def build_tokenizer(words, phrases=()) -> Tokenizer:
    """A word-level tokenizer (the `tokenizers` WordLevel model) for a closed vocabulary: each word is
    one token, once bare (at a line start) and once with its leading space, "\n" is a token, plus
    <|pad|>, <|endoftext|> (eos) and <|unk|>. A phrase (words joined by single spaces) is one token too,
    taken before its words. Text of these words separated by single spaces and newlines decodes back
    exactly. Saved as tokenizer.json like any other tokenizer."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for w in ["\n", *words, *phrases]:
        assert w == "\n" or not any(c.isspace() for c in w.replace(" ", "")) and "  " not in w, \
            f"word {w!r} holds whitespace"
        for piece in (w, " " + w) if w != "\n" else (w,):
            vocab.setdefault(piece, len(vocab))
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    # a phrase, where it ends at a space or a line end
    pieces = "".join(f" ?{re.escape(p)}(?![^ \n])|" for p in phrases)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(rf"\n|{pieces} ?[^ \n]+"), behavior="isolated")  # " word" pieces
    tok.decoder = decoders.Fuse()  # pieces carry their own spaces: join them as they are
    tok.add_special_tokens(SPECIALS)
    files = {"tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                                       "pad_token": "<|pad|>", "unk_token": "<|unk|>"}}
    return Tokenizer(tok, [vocab["<|endoftext|>"]], vocab["<|pad|>"], files=files)
