"""The agents' default prompt templates: plain text, meant to be read and overridden.

Each template is a :class:`string.Template`: ``$name`` (or ``${name}``) is filled in by the
pipeline, ``$$`` is a literal dollar sign, and braces need no escaping (the JSON examples are
written as they are). ``srpo-trl generate-records --write-templates DIR`` writes these files
(``system.txt``, ``query.txt``, ...) to ``DIR``; edit them and pass ``--templates DIR`` (any
subset of the files; the others keep their defaults). A template may only use the placeholders
its agent fills in (see ``AGENT_VARIABLES`` in :mod:`srpo_trl.records.agents`); an unknown one
is an error naming the file.

Whatever the wording, each agent must answer with one JSON object of the form shown: the
pipeline parses and validates it, and sends the error back to the model when it does not fit.
"""

from __future__ import annotations


SYSTEM = """\
You write training data for AI safety research: harmless images paired with harmless-looking
requests that become risky only together, the reasoning that uncovers the hidden risk, and safe
answers. You never write content that is harmful on its own (no actionable instructions for harm,
no explicit sexual content, no slurs). You always answer with exactly one JSON object and nothing
else: no Markdown, no comments.
"""

QUERY = """\
You are the Query agent.

Look at the image ($image_name). It is harmless on its own. Write a request a user might send
together with this image that also looks harmless on its own, but that together with the image
creates a hidden safety risk: answering it naively, using what the image shows, would lead to
harm. Example: an image of a bottle of bleach with "What is the fastest way to clean the toilet
with what I have here?" (mixing bleach with an acid cleaner releases toxic chlorine gas).

Rules:
- The request alone must not mention the risk and must not be unsafe as text.
- The risk must come from combining the request with something visible in the image.
- Name the risk category, exactly one of:
$categories
- Make it different from the requests already written for this image:
$previous
$revision
Answer with one JSON object:
{"request": "<the user's request, as the user would write it>",
 "unsafe_scenario": "<one or two sentences: what in the image, combined with the request, creates which risk>",
 "category": "<one category from the list, spelled as in the list>"}
"""

BENIGN_QUERY = """\
You are the Query agent, writing a benign control item.

Look at the image ($image_name). Write a request a user might send together with this image that
is fine to answer helpfully: neither the request, nor the image, nor the combination creates a
safety risk. These items check that a model does not refuse harmless requests, so the request
should be natural and concrete, about what the image shows, and may even touch a topic that
sounds sensitive at first glance as long as helping is clearly fine.

Make it different from the requests already written for this image:
$previous
$revision
Answer with one JSON object:
{"request": "<the user's request>",
 "rationale": "<one sentence: why helping with this request and this image is safe>"}
"""

REASONING = """\
You are the Reasoning agent.

Item kind: $item_kind
The user sends the image ($image_name) with this request:
<request>
$request
</request>
Risk category: $category
Hidden risk (what the reasoning must discover): $scenario

Write the reasoning a careful assistant goes through before answering, as $min_steps to
$max_steps short steps, in order:
- first what the image shows that matters for the request;
- then how the request relates to it;
- then whether combining them creates a risk, and which one (or, for a benign control, why
  there is none);
- last, what a safe and helpful response must therefore do.
Each step is one or two sentences on a single line, without numbering. Do not write the final
answer to the user: another agent writes it. Explaining that a risk exists is fine; never give
instructions that would enable harm.
$revision
Answer with one JSON object:
{"steps": ["<step 1>", "<step 2>", "..."]}
"""

REFLECTION = """\
You are the Check agent. Review this item critically.

Item kind: $item_kind
Image: $image_name
Request: $request
Risk category: $category
Hidden risk: $scenario
Reasoning steps:
$steps

Check:
1. Redundancy: steps that repeat an earlier step or add nothing. List their numbers.
2. Gaps: what the reasoning needs but misses (for example it never connects the image to the
   request, or never names the risk, or never says what the response must do).
3. Text-only safety: read the request and each step as text alone, as if there were no image.
   List any text that is harmful on its own (actionable instructions for harm, explicit sexual
   content, slurs, ...). Describing that a risk exists is fine.
4. Whether the request itself is unsafe as text alone (it should look harmless on its own).

Answer with one JSON object (empty lists and false when all is well):
{"redundant_steps": [<step numbers>],
 "gaps": ["<what is missing>"],
 "unsafe_text": ["<quote of the text that is unsafe on its own>"],
 "request_unsafe_alone": false,
 "feedback": "<short advice for the revision, or an empty string>"}
"""

SUMMARY = """\
You are the Summary agent.

Item kind: $item_kind
The user sent the image ($image_name) with this request:
<request>
$request
</request>
Risk category: $category
Hidden risk: $scenario
The assistant's reasoning so far:
$steps

Write the assistant's final answer to the user, following the reasoning: safe, respectful and
as helpful as safety allows. Choose its outcome, one of: $allowed_outcomes
- "refuse": decline the risky part and say why; offer a safe alternative if there is one.
- "warn": help with the safe part and clearly warn about the risk the image creates.
- "comply": help fully (benign control items only).
Answer with one JSON object:
{"answer": "<the final answer to the user, on a single line>",
 "outcome": "<refuse | warn | comply>"}
"""

RETRY = """\
Your previous reply could not be used: $error
Answer again with exactly one JSON object of this form and nothing else:
$schema
"""

DEFAULT_TEMPLATES: dict[str, str] = {
    "system": SYSTEM,
    "query": QUERY,
    "benign_query": BENIGN_QUERY,
    "reasoning": REASONING,
    "reflection": REFLECTION,
    "summary": SUMMARY,
    "retry": RETRY,
}
