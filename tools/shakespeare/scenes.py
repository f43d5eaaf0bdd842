"""Split a cleaned play into scenes and speeches, and turn two-speaker exchanges into chat conversations.

In the Gutenberg texts a speech is a paragraph whose first line is the speaker ("KING HENRY.", "Romeo.",
or in one play "HERMIA" with no period) and whose other lines are the speech; paragraphs that follow
without a speaker line (verse resumed after a stage direction) belong to the same speech. Scenes begin
at an "ACT ..." or "SCENE ..." heading.
"""

import re
from dataclasses import dataclass, field

HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
SPEAKER = re.compile(r"^(?:[A-Z][A-Z'&, -]*[A-Z]\.?|[A-Z][a-z]+(?: [A-Z][a-z]+){0,2}\.)$")
STAGE_DIRECTION = re.compile(r"^\[[^\]]*\]$", re.S)


@dataclass
class Speech:
    speaker: str  # without the final period
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Scene:
    heading: str
    speeches: list[Speech] = field(default_factory=list)


def parse_scenes(text: str) -> list[Scene]:
    """Scenes of a play in order; text before the first heading (title, cast list) is skipped."""
    scenes: list[Scene] = []
    speech = None
    for paragraph in text.split("\n\n"):
        lines = paragraph.split("\n")
        if HEADING.match(lines[0]):
            scenes.append(Scene(heading=paragraph))
            speech = None
        elif not scenes:
            continue
        elif len(lines) >= 2 and SPEAKER.match(lines[0]):
            speech = Speech(lines[0].removesuffix("."), lines[1:])
            scenes[-1].speeches.append(speech)
        elif speech is not None and not STAGE_DIRECTION.match(paragraph):
            speech.lines.extend(lines)  # the speech goes on after a stage direction
    return scenes


def conversations(scene: Scene, min_turns: int = 2) -> list[list[dict]]:
    """Maximal runs of speeches alternating between two speakers, as chat messages.

    The first speaker of a run is the user, the second the assistant; a run ends on an assistant turn.
    Each conversation starts with a system message holding the scene heading.
    """
    speeches = scene.speeches
    result = []
    start = 0
    while start < len(speeches) - 1:
        end = start + 1  # speeches[start:end] alternate between two speakers
        while end < len(speeches) and speeches[end].speaker != speeches[end - 1].speaker and (
                end - start < 2 or speeches[end].speaker == speeches[end - 2].speaker):
            end += 1
        run = speeches[start:end]
        run = run[: len(run) // 2 * 2]  # end on the assistant
        if len(run) >= min_turns:
            messages = [{"role": "system", "content": scene.heading}]
            for i, s in enumerate(run):
                messages.append({"role": "user" if i % 2 == 0 else "assistant", "name": s.speaker,
                                 "content": s.text})
            result.append(messages)
        start = max(end - 1, start + 1)
    return result
