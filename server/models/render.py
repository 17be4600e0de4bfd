"""Messages → the exact prompt text and token ids the engine receives, per family.

Owns: the model's tokenizer, its family's template and conversation rules, BOS handling,
the template fingerprint, and keeping user text from ever becoming a control token. One
renderer serves HTTP requests, batch generation and training-data export, so the prompt a
model is trained on is the one it is served with.
Does not know: HTTP, engines, sampling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.models.families import FamilySpec, family, resolve_template_file

log = logging.getLogger(__name__)

DEFAULT_QUANTILE_TOKENS = tuple(f"_QUANTILE_TOKEN_{k}_" for k in range(5))
CHECKPOINT_TEMPLATE_NAME = "checkpoint-chat-template"


class RenderError(ValueError):
    """A conversation this model's format cannot express (a client error)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class FamilyDetectionError(ValueError):
    """A models-file entry without ``family`` whose checkpoint does not tell."""


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    # An assistant's calls, OpenAI's shape (``function.arguments``: JSON text); the call a
    # tool message answers. Only chat templates that take tools render them.
    tool_calls: tuple[dict[str, Any], ...] | None = None
    tool_call_id: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        """The message as HF chat templates read it (vLLM's way: a call's arguments as an
        object, not JSON text)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    **call,
                    "function": {
                        **call["function"],
                        "arguments": json.loads(call["function"]["arguments"].strip() or "{}"),
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True, slots=True)
class PromptForm:
    """How a conversation ends in its prompt: the answer's opening (the generation prompt)
    or not, and an assistant prefill the model continues."""

    generation_prompt: bool = True
    prefill: str | None = None


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """``text`` is the template's output; ``token_ids`` also carry the family's BOS."""

    text: str
    token_ids: list[int]


def detect_family(
    tokenizer: Any, quantile_tokens: tuple[str, ...] = DEFAULT_QUANTILE_TOKENS
) -> str:
    vocab = tokenizer.get_vocab()
    if all(token in vocab for token in quantile_tokens):
        return "quark"
    if getattr(tokenizer, "chat_template", None):
        return "chat"
    raise FamilyDetectionError(
        "cannot tell this checkpoint's prompt format: its tokenizer has neither the Quark "
        "quantile tokens nor a chat template. Set `family` (cut | kto | dpo | quark | chat) "
        "in its models-file entry."
    )


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env


# Private-use characters; a stand-in for a control token is built from one the text lacks.
_MARKS = tuple(chr(c) for c in range(0x10FFFD, 0x10FEFF, -1))


class _GuardedEncoder:
    """A fast tokenizer's one-pass encoding of a text in which only given spans (those the
    template wrote) may become control tokens; every other character is ordinary text.

    It runs the tokenizer's own model, normalizer and pre-tokenizer (shared, not copied)
    without its added vocabulary, so user text such as ``</s>`` or ``<|user|>`` is characters
    (what ``split_special_tokens=True`` does to special tokens), plus one stand-in added
    token per control token, matched with the same options (lstrip, rstrip, single_word,
    normalized). The template's control tokens are swapped for their stand-ins and the text
    is encoded in ONE pass: the stretches between control tokens are cut, normalized and
    pre-tokenized exactly as in the tokenizer's own pass (SentencePiece's ``▁`` only at the
    very start, none after ``</s>``; a legacy ``Prepend`` normalizer after each control
    token), and no seam of ours adds a token."""

    def __init__(self, backend: Any):
        self._backend = backend
        self.added = dict(sorted(backend.get_added_tokens_decoder().items()))
        self.id_of = {token.content: i for i, token in self.added.items()}
        self._cached: tuple[str, Any, dict[str, str], dict[int, int]] | None = None

    def _with_stand_ins(self, mark: str) -> tuple[Any, dict[str, str], dict[int, int]]:
        if self._cached is not None and self._cached[0] == mark:
            return self._cached[1:]
        from tokenizers import AddedToken, Tokenizer

        plain = Tokenizer(self._backend.model)
        if self._backend.normalizer is not None:
            plain.normalizer = self._backend.normalizer
        if self._backend.pre_tokenizer is not None:
            plain.pre_tokenizer = self._backend.pre_tokenizer
        stand_in: dict[str, str] = {}
        back: dict[int, int] = {}
        for k, (token_id, token) in enumerate(self.added.items()):
            text = f"{mark}{k}{mark}"
            options = {o: getattr(token, o) for o in ("single_word", "lstrip", "rstrip")}
            plain.add_tokens([AddedToken(text, normalized=token.normalized, **options)])
            stand_in[token.content] = text
            back[plain.token_to_id(text)] = token_id
        if mark == _MARKS[0]:
            self._cached = (mark, plain, stand_in, back)
        return plain, stand_in, back

    def encode(self, text: str, controls: list[tuple[int, int]]) -> list[int] | None:
        """Ids of ``text`` with control tokens exactly at ``controls`` (sorted character
        spans, each an added token's text); None where the tokenizer would not match one of
        them there (e.g. a ``single_word`` token inside a word)."""
        mark = next((m for m in _MARKS if m not in text), None)
        if mark is None:
            return None
        plain, stand_in, back = self._with_stand_ins(mark)
        pieces, pos = [], 0
        for start, end in controls:
            pieces += [text[pos:start], stand_in[text[start:end]]]
            pos = end
        pieces.append(text[pos:])
        ids = plain.encode("".join(pieces), add_special_tokens=False).ids
        if sum(1 for i in ids if i in back) != len(controls):
            return None
        return [back.get(i, i) for i in ids]


class Renderer:
    """One model's prompt format: family rules + template + tokenizer."""

    def __init__(
        self,
        tokenizer: Any,
        spec: FamilySpec,
        *,
        template_source: str,
        template_name: str,
        extra_sources: dict[str, str] | None = None,
        quantile_tokens: tuple[str, ...] = (),
        default_quantile: int = 0,
    ):
        self.tokenizer = tokenizer
        self.spec = spec
        self.family = spec.name
        self.template_name = template_name
        self.template_source = template_source
        self.quantile_tokens = quantile_tokens
        self.default_quantile = default_quantile
        self.stop = tuple(spec.stop)
        self._env = _jinja_env()
        self._template = (
            None if spec.uses_checkpoint_template else self._env.from_string(template_source)
        )
        self._extra = {
            name: self._env.from_string(source) for name, source in (extra_sources or {}).items()
        }
        # Every added or special token counts as a control token: user text must never
        # tokenize to one.
        added = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()}
        for token in tokenizer.all_special_tokens:
            added.setdefault(token, tokenizer.convert_tokens_to_ids(token))
        self.control_ids = frozenset(added.values())
        self._special = frozenset(tokenizer.all_special_tokens) | {
            t.content for t in tokenizer.added_tokens_decoder.values() if t.special
        }
        self._control_strings = tuple(sorted(added, key=len, reverse=True))
        self._nonspecial_added = re.compile(
            "|".join(re.escape(s) for s in self._control_strings if s not in self._special)
            or r"(?!)"
        )
        # Where a piece of user text could join the template's text into control text.
        self._control_prefixes = {s[:k] for s in self._control_strings for k in range(1, len(s))}
        self._control_suffixes = {s[k:] for s in self._control_strings for k in range(1, len(s))}
        self._longest_control = max(map(len, self._control_strings), default=0)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._guarded = _GuardedEncoder(backend) if backend is not None else None
        if self._guarded is None:
            log.warning(
                "%s has no fast tokenizer: text next to user text with control-token text "
                "is tokenized piece by piece, which may differ from a one-pass encoding",
                type(tokenizer).__name__,
            )
        # The control tokens a template may write: what the tokenizer matches in one pass.
        written = [t.content for t in self._guarded.added.values()] if self._guarded else added
        self._template_controls = re.compile(
            "|".join(re.escape(s) for s in sorted(written, key=len, reverse=True)) or r"(?!)"
        )
        self.fingerprint = self._fingerprint(extra_sources or {})
        # Whether tools can be rendered: a checkpoint-style chat template that reads `tools`.
        self.supports_tools = spec.uses_checkpoint_template and "tools" in (
            jinja2.meta.find_undeclared_variables(self._env.parse(template_source))
        )

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        family_name: str | None = None,
        template: str | None = None,
        trust_remote_code: bool = False,
        quantile_tokens: list[str] | None = None,
        default_quantile: int | None = None,
        base_dir: Path | None = None,
    ) -> Renderer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        tokens = tuple(quantile_tokens) if quantile_tokens else None
        if family_name is None:
            family_name = detect_family(tokenizer, tokens or DEFAULT_QUANTILE_TOKENS)
            log.info("%s: no family configured; detected %r from the checkpoint", path, family_name)
        spec = family(family_name)
        if tokens is None:
            tokens = tuple(spec.quantile_tokens)
        if spec.quantile_tokens and not tokens:
            raise FamilyDetectionError(f"family {family_name!r} needs quantile_tokens")
        quantile = spec.default_quantile if default_quantile is None else default_quantile
        if tokens and not 0 <= quantile < len(tokens):
            raise FamilyDetectionError(
                f"default_quantile {quantile} is outside 0..{len(tokens) - 1}"
            )
        if template is not None:
            source_path = resolve_template_file(template, base_dir)
            source, name = source_path.read_text(), source_path.name
        elif spec.uses_checkpoint_template:
            source = getattr(tokenizer, "chat_template", None) or ""
            if not isinstance(source, str) or not source:
                raise FamilyDetectionError(
                    f"family {family_name!r} uses the checkpoint's chat template, but "
                    f"{path} has none; set `template` to a Jinja file"
                )
            name = CHECKPOINT_TEMPLATE_NAME
        else:
            source_path = resolve_template_file(spec.template)
            source, name = source_path.read_text(), source_path.name
        extra = {
            key: resolve_template_file(file).read_text()
            for key, file in spec.extra_templates.items()
        }
        missing = [t for t in tokens if t.startswith("_") and t not in tokenizer.get_vocab()]
        if missing:
            raise FamilyDetectionError(
                f"quantile token(s) {', '.join(missing)} are not in {path}'s vocabulary"
            )
        return cls(
            tokenizer,
            spec,
            template_source=source,
            template_name=name,
            extra_sources=extra,
            quantile_tokens=tokens,
            default_quantile=quantile,
        )

    def _fingerprint(self, extra_sources: dict[str, str]) -> str:
        tok = self.tokenizer
        facts = {
            "family": self.family,
            "template": self.template_source,
            "extra": extra_sources,
            "stop": list(self.stop),
            "bos_rule": self.spec.bos,
            "bos": [tok.bos_token, tok.bos_token_id],
            "eos": [tok.eos_token, tok.eos_token_id],
            "system": self.spec.system,
            "strip": self.spec.strip_content,
            "quantile_tokens": [[t, tok.convert_tokens_to_ids(t)] for t in self.quantile_tokens],
        }
        blob = json.dumps(facts, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ---- conversation rules -------------------------------------------------------------

    def _conversation(self, messages: list[Message]) -> tuple[str | None, list[Message]]:
        """Split off the system message and check the family's turn rules."""
        system: str | None = None
        turns = list(messages)
        if turns and turns[0].role == "system":
            system = turns.pop(0).content
            if not self.spec.system_message:
                raise RenderError(
                    f"The {self.family} format has no system message.", param="messages"
                )
        if any(m.role == "system" for m in turns):
            raise RenderError("A system message may only come first.", param="messages")
        if not self.supports_tools and any(m.role == "tool" or m.tool_calls for m in turns):
            raise RenderError(
                f"This model's {self.family} template has no tool calls or tool messages.",
                param="messages",
            )
        if not turns or turns[-1].role not in ("user", "tool"):
            raise RenderError(
                "The last message must be from the user (or a tool).", param="messages"
            )
        if not self.spec.multi_turn and len(turns) != 1:
            raise RenderError(
                f"The {self.family} format takes exactly one user message "
                f"(got {len(turns)} turns).",
                param="messages",
            )
        if not self.spec.uses_checkpoint_template:
            for i, m in enumerate(turns):
                expected = "user" if i % 2 == 0 else "assistant"
                if m.role != expected:
                    raise RenderError(
                        f"The {self.family} format needs turns alternating user/assistant, "
                        f"starting with the user (message {i} is {m.role}).",
                        param="messages",
                    )
        if system is None:
            system = self.spec.system
        if self.spec.strip_content:
            turns = [dataclasses.replace(m, content=m.content.strip()) for m in turns]
            system = system.strip() if system is not None else None
        return system, turns

    def _quantile_token(self, quantile: int | None) -> str:
        if not self.quantile_tokens:
            if quantile is not None:
                raise RenderError(
                    f"`quantile` applies to Quark models only; this one is {self.family}.",
                    param="quantile",
                )
            return ""
        k = self.default_quantile if quantile is None else quantile
        if not 0 <= k < len(self.quantile_tokens):
            raise RenderError(
                f"quantile must be in 0..{len(self.quantile_tokens) - 1}", param="quantile"
            )
        return self.quantile_tokens[k]

    # ---- rendering ----------------------------------------------------------------------

    def _render_source(
        self,
        template: jinja2.Template | None,
        system: str | None,
        turns: list[Message],
        variables: dict[str, Any],
        form: PromptForm,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        tok = self.tokenizer
        if template is None:  # the checkpoint's own chat template (vLLM's way: HF's)
            conversation = [{"role": "system", "content": system}] if system is not None else []
            conversation += [m.as_template_message() for m in turns]
            if form.prefill is not None:
                conversation.append({"role": "assistant", "content": form.prefill})
            try:
                return tok.apply_chat_template(
                    conversation,
                    tools=tools or None,
                    tokenize=False,
                    add_generation_prompt=form.generation_prompt and form.prefill is None,
                    continue_final_message=form.prefill is not None,
                    chat_template=self.template_source,
                    **variables,
                )
            except ValueError as exc:  # HF's refusals (a prefill the template rewrites)
                raise RenderError(str(exc), param="messages") from exc
        text = template.render(
            messages=[{"role": m.role, "content": m.content} for m in turns],
            system_message=system,
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
            add_generation_prompt=True,
            **variables,
        )
        # A fixed template's generation prompt opens the answer: the prefill continues it.
        return text + (form.prefill or "")

    def _render(
        self,
        template: jinja2.Template | None,
        messages: list[Message],
        variables: dict[str, Any],
        form: PromptForm | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> RenderedPrompt:
        form = form or PromptForm()
        system, turns = self._conversation(messages)
        self._check_tool_text(tools, turns)
        try:
            text = self._render_source(template, system, turns, variables, form, tools)
            contents = ([system] if system is not None else []) + [m.content for m in turns]
            contents += [form.prefill] if form.prefill else []
            contents += [
                v
                for v in variables.values()
                if isinstance(v, str) and v not in self.quantile_tokens
            ]
            if any(self._meets_control_text(c) for c in contents):
                ids = self._tokenize_guarded(template, system, turns, variables, text, form, tools)
            else:
                # Common case: the whole text in one pass, exactly as a trainer would. No
                # control text lies in or across the user's text, so each control token the
                # tokenizer finds is one the template wrote.
                ids = self._encode(text)
        except jinja2.TemplateError as exc:
            raise RenderError(
                f"The model's template refused the conversation: {exc}", param="messages"
            ) from exc
        return RenderedPrompt(text=text, token_ids=self._with_bos(ids))

    def render_chat(
        self,
        messages: list[Message],
        *,
        quantile: int | None = None,
        template_kwargs: dict[str, Any] | None = None,
        generation_prompt: bool = True,
        continue_final: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> RenderedPrompt:
        """The prompt for ``messages``. vLLM's chat options: ``template_kwargs`` are the
        checkpoint chat template's variables (chat-template families only);
        ``continue_final`` renders the last message, the assistant's, open for the model
        to continue (a prefill); ``generation_prompt`` False leaves the answer's opening
        out (checkpoint templates only: a fixed template always opens the answer);
        ``tools`` (OpenAI's function definitions) go to a chat template that takes them."""
        token = self._quantile_token(quantile)
        fixed = self._template is not None
        if tools and not self.supports_tools:
            raise RenderError(
                f"This model's {self.family} template does not take tools "
                f"({'a fixed format' if fixed else 'its chat template never reads `tools`'}).",
                param="tools",
            )
        if template_kwargs and fixed:
            raise RenderError(
                f"`chat_template_kwargs` applies to models rendered by their checkpoint's "
                f"chat template; this model's {self.family} format is a fixed template.",
                param="chat_template_kwargs",
            )
        prefill: str | None = None
        if continue_final:
            if messages[-1].role != "assistant":
                raise RenderError(
                    "`continue_final_message` continues the last message: it must be the "
                    "assistant's.",
                    param="messages",
                )
            prefill, messages = messages[-1].content, messages[:-1]
        elif not generation_prompt and fixed:
            raise RenderError(
                f"`add_generation_prompt: false` cannot be rendered in the {self.family} "
                "format: its template always opens the answer (continue an assistant "
                "message with `continue_final_message` instead).",
                param="add_generation_prompt",
            )
        variables: dict[str, Any] = {"quantile_token": token} if token else {}
        if template_kwargs:
            variables = dict(template_kwargs)
        form = PromptForm(generation_prompt=generation_prompt, prefill=prefill)
        return self._render(self._template, messages, variables, form, tools)

    def _check_tool_text(self, tools: list[dict[str, Any]] | None, turns: list[Message]) -> None:
        """Tool definitions and calls reach the prompt as JSON the template writes (no
        stand-in can mark them as the user's): none may hold control-token text."""
        # As the template gets them: a call's arguments decoded (a JSON escape such as
        # \u003c must not hide control text).
        calls = [m.as_template_message()["tool_calls"] for m in turns if m.tool_calls]
        ids = [m.tool_call_id for m in turns if m.tool_call_id is not None]
        if (tools or calls or ids) and self.has_control_text(
            json.dumps([tools, calls, ids], ensure_ascii=False)
        ):
            raise RenderError(
                "Tool definitions and calls must not contain this model's control-token text.",
                param="tools" if tools else "messages",
            )

    def render_extra(self, name: str, messages: list[Message], **variables: str) -> RenderedPrompt:
        """A family's other format, e.g. CUT's judgment prompt (``judge``)."""
        if name not in self._extra:
            raise RenderError(f"The {self.family} family has no {name!r} template.")
        if self._template is None:
            # A checkpoint's chat template is the tokenizer's; the family's other format is
            # then the last user turn's text, rendered through that chat template (and
            # tokenized as user text: nothing in it can become a control token).
            turns = [{"role": m.role, "content": m.content} for m in messages]
            content = self._extra[name].render(messages=turns, **variables)
            return self._render(None, [*messages[:-1], Message("user", content)], {})
        return self._render(self._extra[name], messages, dict(variables))

    def render_text(self, prompt: str, *, quantile: int | None = None) -> RenderedPrompt:
        """A completions prompt: raw text, except that Quark still gets its quantile prefix."""
        if self.quantile_tokens:
            return self.render_chat([Message("user", prompt)], quantile=quantile)
        self._quantile_token(quantile)  # refuses `quantile` on other families
        if self.spec.bos == "template":
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            return RenderedPrompt(text=prompt, token_ids=list(ids))
        return RenderedPrompt(text=prompt, token_ids=self._with_bos(self._encode(prompt)))

    def encode_raw(self, text: str) -> list[int]:
        """``text`` as the tokenizer reads it: control text becomes control tokens and no
        special token is added (vLLM's ``add_special_tokens: false``)."""
        return self._encode(text)

    def render_ids(self, token_ids: list[int]) -> RenderedPrompt:
        vocab = len(self.tokenizer)
        bad = next((t for t in token_ids if t < 0 or t >= vocab), None)
        if bad is not None:
            raise RenderError(f"token id {bad} is outside the vocabulary (size {vocab}).", "prompt")
        return RenderedPrompt(text=self.tokenizer.decode(token_ids), token_ids=list(token_ids))

    # ---- tokenization -------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.tokenizer.bos_token_id
        if self.spec.bos == "add" and bos is not None and ids[:1] != [bos]:
            return [bos, *ids]
        return ids

    def has_control_text(self, text: str) -> bool:
        """Whether ``text`` contains the text of any control token."""
        return any(s in text for s in self._control_strings)

    def _meets_control_text(self, text: str) -> bool:
        """Whether ``text``, as the template places it (trimmed or not), holds control text
        or could form control text with the template's text around it: it begins with the
        end of a control string (``s>`` after a template's ``</``), ends with the start of
        one, or lies inside one."""
        for form in {text, text.strip(), text.lstrip(), text.rstrip()} - {""}:
            if self.has_control_text(form) or any(form in s for s in self._control_strings):
                return True
            ends = range(1, min(len(form), self._longest_control) + 1)
            if any(form[:k] in self._control_suffixes for k in ends) or any(
                form[-k:] in self._control_prefixes for k in ends
            ):
                return True
        return False

    def plain_ids(self, text: str) -> list[int]:
        """``text`` alone, tokenized as user text: every character ordinary, so no part of
        it becomes a control token."""
        ids = self._guarded.encode(text, []) if self._guarded is not None else None
        return ids if ids is not None else self._plain(text)

    def _plain(self, text: str) -> list[int]:
        """Tokenize user text so that no part of it becomes a control token (piece by piece:
        the fallback for tokenizers without a fast backend)."""
        ids: list[int] = []
        pos = 0
        for match in self._nonspecial_added.finditer(text):
            ids += self._split_special(text[pos : match.start()])
            # An added (non-special) token's text, cut after its first character so the
            # tokenizer cannot match it whole.
            ids += self._split_special(match.group()[:1]) + self._plain(match.group()[1:])
            pos = match.end()
        return ids + self._split_special(text[pos:])

    def _split_special(self, text: str) -> list[int]:
        if not text:
            return []
        return list(
            self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        )

    def _tokenize_guarded(
        self,
        template: jinja2.Template | None,
        system: str | None,
        turns: list[Message],
        variables: dict[str, Any],
        text: str,
        form: PromptForm | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """``text`` in one pass, with control tokens only where the template wrote them.

        Renders once more with unguessable placeholders in place of the user's text to find
        which stretches of ``text`` the template wrote and which the user did."""
        nonce = secrets.token_hex(8)
        marks: dict[str, str] = {}

        def mark(value: str) -> str:
            if not value:  # nothing to place; a template may test for emptiness
                return value
            key = f"\x00{nonce}:{len(marks)}\x00"
            marks[key] = value
            return key

        marked_system = mark(system) if system is not None else None
        marked_turns = [dataclasses.replace(m, content=mark(m.content)) for m in turns]
        marked_vars = {
            k: (mark(v) if isinstance(v, str) and v not in self.quantile_tokens else v)
            for k, v in variables.items()
        }
        form = form or PromptForm()
        marked_form = dataclasses.replace(
            form, prefill=mark(form.prefill) if form.prefill else form.prefill
        )
        skeleton = self._render_source(
            template, marked_system, marked_turns, marked_vars, marked_form, tools
        )
        parts = re.split(f"(\x00{nonce}:\\d+\x00)", skeleton)
        pieces: list[tuple[str, bool]] = []  # (text, written by the template)
        pos = 0
        for i, part in enumerate(parts):
            if part in marks:
                value = marks[part]
                following = parts[i + 1] if i + 1 < len(parts) else ""
                # The template may have trimmed the text; take the form that fits.
                for form in (value, value.strip(), value.lstrip(), value.rstrip()):
                    end = pos + len(form)
                    if text.startswith(form, pos) and text.startswith(following, end):
                        pieces.append((form, False))
                        pos = end
                        break
                else:
                    raise RenderError(
                        "The message text contains reserved token text that this model's "
                        "template transforms; it cannot be rendered safely.",
                        param="messages",
                    )
            else:
                if not text.startswith(part, pos):
                    raise RenderError("The template is not deterministic.", param="messages")
                pieces.append((part, True))
                pos += len(part)
        return self._encode_pieces(pieces)

    def _encode_pieces(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """One pass over the joined pieces; control tokens only inside the template's
        stretches (adjacent template pieces form one stretch)."""
        text = "".join(piece for piece, _ in pieces)
        controls: list[tuple[int, int]] = []
        pos, stretch = 0, 0  # ``stretch``: where the current template stretch began
        for piece, by_template in pieces:
            if not by_template and piece:
                controls += self._controls_in(text, stretch, pos)
                stretch = pos + len(piece)
            pos += len(piece)
        controls += self._controls_in(text, stretch, pos)
        ids = self._guarded.encode(text, controls) if self._guarded is not None else None
        if ids is not None:
            # By construction only the template's control tokens are control ids (an <unk>
            # for an unknown character aside); checked, not assumed.
            unk = self.tokenizer.unk_token_id
            if sum(1 for i in ids if i in self.control_ids and i != unk) != sum(
                1 for start, end in controls if self._guarded.id_of[text[start:end]] != unk
            ):
                raise RenderError(
                    "The message text would tokenize to a control token of this model; it "
                    "cannot be rendered safely.",
                    param="messages",
                )
            return ids
        if self._guarded is not None:
            log.warning(
                "%s: one-pass guarded encoding failed; encoding piece by piece", self.family
            )
        return [
            t
            for piece, by_template in pieces
            for t in (self._encode(piece) if by_template else self._plain(piece))
        ]

    def _controls_in(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        return [m.span() for m in self._template_controls.finditer(text, start, end)]

    def count_control_ids(self, ids: list[int]) -> int:
        return sum(1 for t in ids if t in self.control_ids)
