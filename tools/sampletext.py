"""The words, prose, code and tool output of the sample tree's sessions
(sampletree.py), drawn from a seeded random.Random: the same seed, the same text."""

from __future__ import annotations

import random
import uuid
from datetime import datetime

# Word lists as blocks of words: easier to read and extend than columns of quoted strings.
WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one
have this from or had by not word but what some we can out other were all there
when up use your how said an each she which do their time if will way about many
then them write would like so these her long make thing see him two has look more
day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under
name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here
must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father
session file user agent model token request response error retry cache index
chunk store migrate mount commit branch merge test build deploy config schema
query table column value field record stream buffer socket thread process queue
worker job task batch limit timeout latency memory disk page block offset length
hash digest compress decompress encode decode parse render format export import
update delete insert select filter sort group count sum average report summary
customer invoice payment order product price discount shipping address email
meeting agenda notes draft review feedback approve reject deadline sprint ticket
bug fix patch release version upgrade rollback backup restore snapshot volume
function method class object module package library framework interface type
should could would might maybe probably actually really already still just quite
café naïve über résumé façade jalapeño déjà coöperate Zürich São Paulo Kraków
""".split()  # noqa: SIM905
IDENT_VERBS = "get set load save parse build read write fetch open close apply merge".split()  # noqa: SIM905
IDENT_NOUNS = """session user chunk index store record config cache buffer token request
page block item entry path name value handler client server""".split()  # noqa: SIM905
TYPES = ["int", "str", "bytes", "bool", "float", "Path", "dict[str, int]", "list[str]", "None"]
PROJECTS = "billing-api web-dashboard ingest-worker mobile-app data-pipeline infra".split()  # noqa: SIM905
MODELS = ["gpt-4o-2024-08-06", "claude-3-5-sonnet-20241022", "llama-3.1-70b", "o1-mini"]
TOOLS = ["read_file", "edit_file", "run_command", "search", "list_dir"]

# Zipf-like weights by list position: common words first, as in English text.
POPULATION: list[str] = [w for r, w in enumerate(WORDS) for _ in range(max(1, 40 // (r + 1)))]


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def prose(rng: random.Random, n_words: int) -> str:
    words = rng.choices(POPULATION, k=max(1, n_words))
    sentences: list[str] = []
    i = 0
    while i < len(words):
        n = rng.randint(5, 18)
        s = words[i : i + n]
        s[0] = s[0].capitalize()
        sentences.append(" ".join(s) + rng.choice(".....?!:"))
        i += n
        if rng.random() < 0.12:
            sentences.append("\n\n")
    return " ".join(sentences).replace(" \n\n ", "\n\n").strip()


def ident(rng: random.Random) -> str:
    return f"{rng.choice(IDENT_VERBS)}_{rng.choice(IDENT_NOUNS)}"


def python(rng: random.Random) -> str:
    fn, a, b, v = ident(rng), rng.choice(IDENT_NOUNS), rng.choice(IDENT_NOUNS) + "s", "result"
    return (
        f"def {fn}({a}: {rng.choice(TYPES)}, {b}: {rng.choice(TYPES)} | None = None)"
        f" -> {rng.choice(TYPES)}:\n"
        f'    """{prose(rng, rng.randint(6, 14))}"""\n'
        f"    {v} = {a}.{ident(rng)}({b} or {rng.randint(0, 4096)})\n"
        f"    if not {v}:\n"
        f'        raise ValueError(f"{fn}: no {rng.choice(IDENT_NOUNS)} for {{{a}!r}}")\n'
        f"    return [x for x in {v} if x.{rng.choice(IDENT_NOUNS)}]\n"
    )


def typescript(rng: random.Random) -> str:
    fn = ident(rng).replace("_", "")
    t = rng.choice(IDENT_NOUNS).capitalize()
    return (
        f"export async function {fn}(id: string, opts: {t}Options = {{}}): Promise<{t}> {{\n"
        f"  const res = await fetch(`/api/{rng.choice(IDENT_NOUNS)}s/${{id}}`, opts);\n"
        f"  if (!res.ok) throw new Error(`{fn} failed: ${{res.status}}`);\n"
        f"  // {prose(rng, rng.randint(5, 12))}\n"
        f"  return (await res.json()) as {t};\n"
        f"}}\n"
    )


def code_block(rng: random.Random) -> str:
    if rng.random() < 0.6:
        body = "\n".join(python(rng) for _ in range(rng.randint(1, 3)))
        return f"```python\n{body}```"
    body = "\n".join(typescript(rng) for _ in range(rng.randint(1, 3)))
    return f"```typescript\n{body}```"


def tool_output(rng: random.Random, tool: str, path: str) -> str:
    if tool == "read_file":
        return "\n".join(python(rng) for _ in range(rng.randint(1, 6)))
    if tool == "run_command":
        lines = [
            f"tests/test_{ident(rng)}.py::test_{ident(rng)} "
            + ("PASSED" if rng.random() < 0.9 else "FAILED")
            for _ in range(rng.randint(3, 40))
        ]
        return "\n".join(lines) + f"\n{len(lines)} tests ran in {rng.uniform(0.1, 30):.2f}s"
    if tool == "search":
        return "\n".join(
            f"{path}:{rng.randint(1, 900)}: {prose(rng, rng.randint(4, 10))}"
            for _ in range(rng.randint(1, 12))
        )
    if tool == "list_dir":
        return "\n".join(f"{ident(rng)}.py" for _ in range(rng.randint(2, 25)))
    return (
        f"ok: 1 file changed, {rng.randint(1, 80)} insertions(+), {rng.randint(0, 40)} deletions(-)"
    )


def title(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(2, 7))).capitalize()
