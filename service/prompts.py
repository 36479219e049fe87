"""Versioned prompts: load `prompts/<task>/vN.yaml`, pack a patient's facts into the token budget,
render the messages and the output schema, and build the engine request.

A prompt file is data (`PromptFile`, a pydantic model: an unknown field or a wrong type is an
error naming it): id, version, description, what it reads, system message, a jinja2 user template
(strict: an undefined variable is an error), the variables it declares, max_tokens, stop strings
and an output JSON schema. Its sha256 (of the file's bytes) travels with every summary, so a
released file is never edited: a change is a new version.

Note text from the record is untrusted. It is placed as quoted data - every line prefixed with
"| " and chat-template control tokens defused - so it cannot end the message it sits in or pose
as instructions, and the output format is enforced by the schema (a grammar in llama.cpp) whose
citation keys are limited to the facts actually shown.

Pure apart from `load_prompt`, which reads one file and keeps the result for the process (it reads
the file again only when its size, mtime or inode changed). Never logs fact or note text.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
import jinja2.meta
import jinja2.sandbox
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from fhir_adapters.errors import ChartbriefError
from fhir_adapters.models import ClinicalContext, Fact, PromptIdentity
from service.config import LlmSettings
from service.llm.base import Engine, GenerationRequest

DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
_SPEC = re.compile(r"^(?P<task>[a-z0-9][a-z0-9_-]*)/(?P<version>v[0-9]+)$")
_KEY_LINE = re.compile(r"^\[([A-Z]{1,3}[0-9]+)\]", re.MULTILINE)

# Per-message tokens the chat template adds around each message ("<|im_start|>user\n" ...), and a
# margin for tokenizer merges across joined lines, so a packed prompt never overflows n_ctx.
_TOKENS_PER_MESSAGE = 8
_SAFETY_MARGIN_TOKENS = 32
# Below this many tokens for facts a summary is not worth generating.
MIN_FACT_BUDGET = 64
# Notes shorter than this after truncation carry too little to be worth their header.
_MIN_NOTE_CHARS = 80
_TRUNCATED = " [...]"

CountTokens = Callable[[str], int]
# What a prompt may read, and the variables its template uses for it (checked for "notes"; a
# record prompt's variables are checked when it is rendered, as before "reads" existed).
_READS = {"record": {"patient_summary", "facts"}, "notes": {"patient_summary", "note"}}


class PromptError(ChartbriefError):
    """A prompt file is malformed or cannot be rendered. The message names the file or field."""


def _filled(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "must be a non-empty string")
    return value


_Text = Annotated[str, AfterValidator(_filled)]
_Name = Annotated[str, Field(min_length=1)]
# Plain phrases for pydantic's error types; others keep pydantic's own message.
_MESSAGES = {
    "int_type": "must be a whole number",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "literal_error": "must be one of " + ", ".join(sorted(_READS)),
    "string_too_short": "must be a non-empty string",
}


class PromptFile(BaseModel):
    """The fields of a prompt file, as written; an unknown field or a wrong type is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: _Text
    version: _Text
    description: str | None = None
    # "record": one request over the packed facts and notes (variables patient_summary, facts);
    # "notes": one short request per note (variables patient_summary, note; see service.narrative).
    reads: Literal["record", "notes"] = "record"
    system: _Text
    template: _Text
    variables: list[_Name]
    max_tokens: int = Field(ge=1, le=32768)
    stop: list[_Name] = Field(default_factory=list)
    output_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class PromptTemplate:
    """A checked prompt file, with the sha256 of its bytes and where it was read from."""

    id: str
    version: str
    sha256: str
    path: Path
    system: str
    template: str
    variables: tuple[str, ...]
    max_tokens: int
    stop: tuple[str, ...] = ()
    output_schema: dict[str, Any] | None = None
    description: str = ""
    reads: str = "record"  # see PromptFile.reads

    @property
    def identity(self) -> PromptIdentity:
        return PromptIdentity(id=self.id, version=self.version, sha256=self.sha256)


@dataclass(frozen=True)
class RenderedPrompt:
    identity: PromptIdentity
    messages: list[dict[str, str]]
    max_tokens: int
    stop: list[str]
    json_schema: dict[str, Any] | None
    citation_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class PackedContext:
    facts_included: list[Fact]
    omitted: dict[str, int]  # fact kind -> how many facts did not fit
    text: str
    truncated: list[str] = field(default_factory=list)  # keys of notes shortened to fit


# --- loading -----------------------------------------------------------------------------------

# What `load_prompt` has read: (resolved path, path as asked) -> (size, mtime, inode, device), template.
_LOADED: dict[tuple[Path, Path], tuple[tuple[int, int, int, int], PromptTemplate]] = {}


def _environment() -> jinja2.Environment:
    # Prompts are plain text, not HTML: escaping would corrupt them. The sandbox keeps a template
    # from reaching Python internals.
    return jinja2.sandbox.SandboxedEnvironment(  # noqa: S701
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
    )


@functools.lru_cache(maxsize=32)
def _compiled(source: str) -> jinja2.Template:
    """A user template compiled once per process (a render per note would otherwise compile it)."""
    return _environment().from_string(source)


def load_prompt(spec: str = "summary/v1", prompts_dir: Path | None = None) -> PromptTemplate:
    """Read and check `<prompts_dir>/<task>/<version>.yaml`; `spec` is "task/vN".

    Once per process: while the file's size, mtime and inode are those it had when it was read, a
    later call returns the same `PromptTemplate` without reading it again.
    """
    match = _SPEC.match(spec)
    if match is None:
        raise PromptError(f"prompt {spec!r} (CHARTBRIEF_PROMPT) must look like 'summary/v1'")
    task, version = match.group("task"), match.group("version")
    path = (prompts_dir or DEFAULT_PROMPTS_DIR) / task / f"{version}.yaml"
    try:
        resolved = path.resolve()
        stat = resolved.stat()
    except OSError as exc:
        raise PromptError(f"prompt file {path} cannot be read ({exc.strerror})") from exc
    key, signature = (resolved, path), (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
    cached = _LOADED.get(key)
    if cached is not None and cached[0] == signature:
        return cached[1]
    try:
        raw = resolved.read_bytes()
    except OSError as exc:
        raise PromptError(f"prompt file {path} cannot be read ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PromptError(f"prompt file {path} is not valid UTF-8 YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PromptError(f"prompt file {path} must hold a mapping of fields")
    try:
        file = PromptFile.model_validate(data)
    except ValidationError as exc:
        raise PromptError(f"prompt file {path}: {_problems(exc)}") from exc
    sha256 = hashlib.sha256(raw).hexdigest()
    template = _template_of(file, path=path, task=task, version=version, sha256=sha256)
    _LOADED[key] = (signature, template)
    return template


def _problems(exc: ValidationError) -> str:
    """Each field pydantic refused, by its path in the file (`stop.1`), and why."""
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "(file)"
        kind = error["type"]
        if kind == "missing":
            problem = "is required"
        elif kind == "extra_forbidden":
            problem = "is not a field of a prompt file"
        else:
            message = _MESSAGES.get(kind, error["msg"][:1].lower() + error["msg"][1:])
            got = repr(error["input"])
            problem = f"{message} (got {got if len(got) <= 60 else got[:57] + '...'})"
        problems.append(f"field {name!r} {problem}")
    return "; ".join(problems)


def _template_of(file: PromptFile, *, path: Path, task: str, version: str, sha256: str) -> PromptTemplate:
    """The checks across fields and against the file's name and jinja2; then the template."""

    def fail(name: str, problem: str) -> PromptError:
        return PromptError(f"prompt file {path}: field {name!r} {problem}")

    if file.id != task:
        raise fail("id", f"is {file.id!r} but the file is {task}/{version}.yaml")
    if file.version != version:
        raise fail("version", f"is {file.version!r} but the file is {task}/{version}.yaml")
    if file.output_schema is not None and file.output_schema.get("type") != "object":
        raise fail("output_schema", "must be a JSON schema mapping with type: object")
    variables = tuple(file.variables)
    env = _environment()
    for name, source in (("system", file.system), ("template", file.template)):
        try:
            used = jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as exc:
            raise fail(name, f"is not a valid jinja2 template: {exc.message} (line {exc.lineno})") from exc
        if name == "system" and used:
            raise fail("system", f"must be plain text, but it uses {', '.join(sorted(used))}")
        if name == "template" and used != set(variables):
            undeclared, unused = sorted(used - set(variables)), sorted(set(variables) - used)
            problem = "; ".join(
                p
                for p in (
                    f"template uses {', '.join(undeclared)} without declaring it" if undeclared else "",
                    f"declares {', '.join(unused)} but the template does not use it" if unused else "",
                )
                if p
            )
            raise fail("variables", f"does not match the template: {problem}")
    if file.reads == "notes" and set(variables) != _READS[file.reads]:
        raise fail(
            "variables", f"of a prompt that reads notes must be {', '.join(sorted(_READS[file.reads]))}"
        )
    return PromptTemplate(
        id=task,
        version=version,
        sha256=sha256,
        path=path,
        system=file.system,
        template=file.template,
        variables=variables,
        max_tokens=file.max_tokens,
        stop=tuple(file.stop),
        output_schema=file.output_schema,
        description=(file.description or "").strip(),
        reads=file.reads,
    )


# --- rendering ---------------------------------------------------------------------------------


def render(
    tpl: PromptTemplate, variables: Mapping[str, Any], *, citation_keys: Sequence[str] | None = None
) -> RenderedPrompt:
    """Fill the template. `citation_keys` limits the schema's citations (default: the `[KEY]` lines shown)."""
    missing = [name for name in tpl.variables if name not in variables]
    if missing:
        raise PromptError(
            f"prompt {tpl.id}/{tpl.version} ({tpl.path.name}): missing variable {', '.join(missing)}"
        )
    try:
        user = _compiled(tpl.template).render({n: variables[n] for n in tpl.variables})
    except jinja2.UndefinedError as exc:
        raise PromptError(f"prompt {tpl.id}/{tpl.version} ({tpl.path.name}): {exc.message}") from exc
    shown = citation_keys if citation_keys is not None else _KEY_LINE.findall(user)
    keys = tuple(dict.fromkeys(shown))
    schema = None
    if tpl.output_schema is not None:
        schema, constrained = with_citation_enum(tpl.output_schema, keys)
        if constrained and not keys:
            raise PromptError(
                f"prompt {tpl.id}/{tpl.version}: no citable facts in the prompt, nothing to summarize"
            )
    return RenderedPrompt(
        identity=tpl.identity,
        messages=[{"role": "system", "content": tpl.system}, {"role": "user", "content": user}],
        max_tokens=tpl.max_tokens,
        stop=list(tpl.stop),
        json_schema=schema,
        citation_keys=keys,
    )


def with_citation_enum(schema: Mapping[str, Any], keys: Sequence[str]) -> tuple[dict[str, Any], bool]:
    """A copy of `schema` whose `citations` arrays only accept `keys`; and whether any was found.

    A grammar-constrained model then cannot cite a key that is not in the prompt.
    """
    result = copy.deepcopy(dict(schema))
    found = False

    def visit(node: Any) -> None:
        nonlocal found
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                cites = props.get("citations")
                if isinstance(cites, dict) and cites.get("type") == "array":
                    cites["items"] = {"type": "string", "enum": list(keys)}
                    found = True
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(result)
    return result, found


# --- packing -----------------------------------------------------------------------------------

_ACTIVE = {"active", "recurrence", "relapse", "on-hold", "unconfirmed", "provisional"}
_RECENT_NOTES = 3
_RECENT_ENCOUNTERS = 5
# Tiers, in the order the budget is spent on them.
_T_PATIENT, _T_PROBLEM, _T_ALLERGY, _T_MED, _T_NOTE, _T_RESULT, _T_ENCOUNTER = range(7)
_T_PROCEDURE, _T_IMMUNIZATION, _T_OLDER = 7, 8, 9

# Control tokens of common chat templates (ChatML, Llama 2/3, Gemma, Mistral): defused in record
# text because llama.cpp tokenizes the formatted prompt with special tokens enabled.
_CONTROL_TOKENS = re.compile(
    r"<\|[^<>|\s]{1,40}\|>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>|</?s>", re.IGNORECASE
)
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def defuse(text: str) -> str:
    """Record text made safe to place in a prompt: no chat control tokens, no control characters."""
    text = _CONTROL_CHARS.sub(" ", text)
    return _CONTROL_TOKENS.sub(lambda m: f" {m.group(0).strip('<>[]|/').replace('|', ' ')} ", text)


def fact_line(fact: Fact) -> str:
    """`[KEY] text` on one line (coded facts)."""
    return f"[{fact.key}] {' '.join(defuse(fact.text).split())}"


def note_block(fact: Fact, body: str | None = None) -> str:
    """A note as a header line and its text quoted line by line with "| "."""
    header = ", ".join(p for p in ("Note", fact.date, defuse(fact.display or "").strip() or None) if p)
    lines = [line.rstrip() for line in defuse(fact.text if body is None else body).splitlines()]
    quoted: list[str] = []
    for line in lines:
        if line or (quoted and quoted[-1] != "|"):  # collapse runs of blank lines
            quoted.append(f"| {' '.join(line.split())}" if line else "|")
    while quoted and quoted[-1] == "|":
        quoted.pop()
    return "\n".join([f"[{fact.key}] {header} (quoted from the record):", *quoted])


def priority_order(facts: Sequence[Fact]) -> list[Fact]:
    """Facts in the order the budget is spent: by tier, most recent first within a tier."""
    newest_first = sorted(facts, key=lambda f: f.date or "", reverse=True)
    tiers: dict[str, int] = {}
    seen_results: set[str] = set()
    notes = encounters = 0
    for fact in newest_first:
        status = (fact.status or "").lower()
        active = not status or status in _ACTIVE
        tier = _T_OLDER
        if fact.kind == "patient":
            tier = _T_PATIENT
        elif fact.kind == "condition" and active:
            tier = _T_PROBLEM
        elif fact.kind == "allergy" and active:
            tier = _T_ALLERGY
        elif fact.kind == "medication" and active:
            tier = _T_MED
        elif fact.kind == "note" and notes < _RECENT_NOTES:
            notes += 1
            tier = _T_NOTE
        elif fact.kind == "observation":
            # The newest value of each test or vital sign; older values wait for leftover room.
            name = (fact.display or fact.text).lower()
            if name not in seen_results:
                seen_results.add(name)
                tier = _T_RESULT
        elif fact.kind == "encounter" and encounters < _RECENT_ENCOUNTERS:
            encounters += 1
            tier = _T_ENCOUNTER
        elif fact.kind == "procedure":
            tier = _T_PROCEDURE
        elif fact.kind == "immunization":
            tier = _T_IMMUNIZATION
        tiers[fact.key] = tier
    return sorted(newest_first, key=lambda f: tiers[f.key])


def pack_context(ctx: ClinicalContext, *, budget_tokens: int, count_tokens: CountTokens) -> PackedContext:
    """The facts that fit in `budget_tokens`, by priority, as prompt text; and what was left out.

    Notes are shortened to fit (at most a third of the budget each, so one long note cannot crowd
    out the problem list and results); the text ends with a line saying what was left out.
    """
    remaining = budget_tokens
    note_cap = max(96, budget_tokens // 3)
    included: list[tuple[Fact, str, int]] = []
    omitted: list[Fact] = []
    truncated: list[str] = []
    for fact in priority_order(ctx.facts):
        if fact.kind == "note":
            block = note_block(fact)
            cost = count_tokens(block + "\n")
            if cost > min(note_cap, remaining):
                shortened = shorten_note(fact, min(note_cap, remaining), count_tokens)
                if shortened is None:
                    omitted.append(fact)
                    continue
                block, cost = shortened, count_tokens(shortened + "\n")
                truncated.append(fact.key)
            item = block
        else:
            item = fact_line(fact)
            cost = count_tokens(item + "\n")
        if cost <= remaining:
            included.append((fact, item, cost))
            remaining -= cost
        else:
            omitted.append(fact)
    # The "left out" line must fit too: give back the lowest-priority facts until it does.
    while omitted:
        summary = _omitted_line(omitted)
        if count_tokens(summary + "\n") <= remaining or not included:
            break
        fact, _item, cost = included.pop()
        remaining += cost
        omitted.append(fact)
        if fact.key in truncated:
            truncated.remove(fact.key)
    coded = [item for fact, item, _ in included if fact.kind != "note"]
    notes = [item for fact, item, _ in included if fact.kind == "note"]
    parts = coded + notes + ([_omitted_line(omitted)] if omitted else [])
    counts: dict[str, int] = {}
    for fact in omitted:
        counts[fact.kind] = counts.get(fact.kind, 0) + 1
    return PackedContext(
        facts_included=[fact for fact, _, _ in included],
        omitted=counts,
        text="\n".join(parts),
        truncated=truncated,
    )


def _omitted_line(omitted: Sequence[Fact]) -> str:
    counts: dict[str, int] = {}
    for fact in omitted:
        counts[fact.kind] = counts.get(fact.kind, 0) + 1
    listed = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return f"(Not shown, for lack of room: {listed}.)"


def shorten_note(fact: Fact, cap: int, count_tokens: CountTokens, *, body: str | None = None) -> str | None:
    """The longest prefix of the note (on a word boundary) whose block fits in `cap` tokens.

    `body`: the text to shorten when it is not the whole note (e.g. without repeated lines).
    """
    body = fact.text if body is None else body
    lo, hi, best = _MIN_NOTE_CHARS, len(body), None
    while lo <= hi:
        mid = (lo + hi) // 2
        cut = body[:mid]
        if mid < len(body) and " " in cut:
            cut = cut[: cut.rindex(" ")]
        block = note_block(fact, cut + _TRUNCATED)
        if count_tokens(block + "\n") <= cap:
            best, lo = block, mid + 1
        else:
            hi = mid - 1
    return best


# --- the request -------------------------------------------------------------------------------


def message_overhead(rendered: RenderedPrompt, count_tokens: CountTokens) -> int:
    """Tokens of the rendered messages with the chat template's wrapping, plus a safety margin."""
    wrapped = sum(count_tokens(m["content"]) + _TOKENS_PER_MESSAGE for m in rendered.messages)
    return wrapped + _SAFETY_MARGIN_TOKENS


def build_request(
    tpl: PromptTemplate, ctx: ClinicalContext, engine: Engine, settings: LlmSettings
) -> tuple[GenerationRequest, RenderedPrompt, PackedContext]:
    """Pack `ctx` into what is left of the engine's context window and build the request.

    budget = n_ctx - max_tokens - the tokens of the prompt without any facts (plus a margin).
    """
    max_tokens = settings.max_tokens or tpl.max_tokens
    patient_summary = " ".join(defuse(ctx.patient_summary).split())
    empty = render(tpl, {"patient_summary": patient_summary, "facts": ""}, citation_keys=["X0"])
    overhead = message_overhead(empty, engine.count_tokens)
    budget = engine.n_ctx - max_tokens - overhead
    if budget < MIN_FACT_BUDGET:
        raise PromptError(
            f"context window too small for prompt {tpl.id}/{tpl.version}: n_ctx {engine.n_ctx} leaves "
            f"{budget} tokens for facts after max_tokens {max_tokens} and {overhead} tokens of template; "
            "raise CHARTBRIEF_LLM__N_CTX or lower CHARTBRIEF_LLM__MAX_TOKENS"
        )
    packed = pack_context(ctx, budget_tokens=budget, count_tokens=engine.count_tokens)
    rendered = render(
        tpl,
        {"patient_summary": patient_summary, "facts": packed.text or "(none)"},
        citation_keys=[f.key for f in packed.facts_included],
    )
    rendered = replace(rendered, max_tokens=max_tokens)
    return request_of(rendered, max_tokens, settings), rendered, packed


def request_of(rendered: RenderedPrompt, max_tokens: int, llm: LlmSettings) -> GenerationRequest:
    """The engine request for a rendered prompt, with the sampling settings."""
    return GenerationRequest(
        messages=rendered.messages,
        max_tokens=max_tokens,
        stop=list(rendered.stop),
        json_schema=rendered.json_schema,
        temperature=llm.temperature,
        top_p=llm.top_p,
        seed=llm.seed,
    )
