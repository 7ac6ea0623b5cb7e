"""Questions and answers over the Python documentation topics (`pydoc_data.topics`), built deterministically
from the documentation's own sentences: "<Subject> is|are <answer>." becomes
"In the Python documentation on '<topic>', what is|are <subject>?" -> "<answer>".

Only subjects that name something (up to 8 words, starting with The/A/An/Each/Every/All/Some or a quoted
name) and answers that are not passive ("is called ...") are kept, so a question never hangs on "If ...",
"This ..." or a half sentence. Each row's group is its topic: held-out topics are
never trained on.
"""

from __future__ import annotations

import re

_SENTENCE_SPLIT = re.compile(r"(?<=\.)\s+(?=[A-Z\"])")
_DEFINITION = re.compile(r"^(?P<subj>(?:(?:The|A|An|Each|Every|All|Some)\b|\"[^\"]+\")[^,;:()|]{0,70}?) "
                         r"(?P<verb>is|are) (?P<pred>[^;]{12,200})\.$")


def pydoc_questions(min_answer_words: int = 3, max_answer_words: int = 25) -> list[dict]:
    """{"question", "answer", "group": topic, "sentence"} rows, in topic order."""
    from pydoc_data.topics import topics

    from hf_tuner.data.text import paragraphs

    rows, seen = [], set()
    for topic, text in sorted(topics.items()):
        for para in paragraphs(text):
            for sentence in _SENTENCE_SPLIT.split(para):
                m = _DEFINITION.match(sentence.strip())
                if not m:
                    continue
                answer = m["pred"].strip()
                if not min_answer_words <= len(answer.split()) <= max_answer_words or "|" in answer:
                    continue  # too short or long, or a row of a text table
                head = [w for w in answer.split()[:2] if w not in ("then", "also", "always", "usually", "now")]
                if head[0].endswith("ed") or len(m["subj"].split()) > 8:
                    continue  # passive ("is called ...") or a clause, not a name, before the verb
                subject = m["subj"][0].lower() + m["subj"][1:] if m["subj"][:2] in ("Th", "A ", "An", "Ea", "Ev",
                                                                                     "Al", "So") else m["subj"]
                question = f"In the Python documentation on '{topic}', what {m['verb']} {subject}?"
                if question in seen:
                    continue
                seen.add(question)
                rows.append({"question": question, "answer": answer, "group": topic, "sentence": sentence.strip()})
    return rows
