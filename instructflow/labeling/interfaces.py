"""The labeling pages, as Label Studio configurations, for the paper's two tasks.

Ranking (InstructGPT's comparison interface): the prompt, then its K responses
as cards the labeler drags into columns "1 (best)" .. "K (worst)"; responses
in the same column are tied. The responses are shown in a random order per
task, named A, B, C...; the task records that order (data.instructflow.order),
so a pull maps the columns back to the responses exactly. Per response, the
paper's flags that fit (fails to follow the instruction, invents facts,
harmful), and a comment.

Demonstration: the prompt, and a box for the response a labeler would want.
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

LETTERS = "ABCDEFGHI"  # K <= 9 responses (the paper: 4 to 9)
RANKER = "rank"
FLAGS = {"fails_instruction": "Fails to follow the instruction", "invents_facts": "Invents facts",
         "harmful": "Harmful or inappropriate"}
COMMENT, DEMONSTRATION = "comment", "demonstration"


def bucket(level: int) -> str:
    """The column of rank `level` (0 best)."""
    return f"rank_{level + 1}"


def ranking_config(k: int) -> str:
    """The ranking page for up to `k` responses per prompt."""
    buckets = "\n".join(f'    <Bucket name="{bucket(i)}" title={quoteattr(title(i, k))}/>' for i in range(k))
    flags = "\n".join(f'  <Header value={quoteattr(label + ":")} size="6"/>\n'
                      f'  <Choices name="{name}" toName="prompt" choice="multiple" showInline="true" value="$letters"/>'
                      for name, label in FLAGS.items())
    return f"""<View>
  <Style>.htx-ranker-item p:last-child {{ display: none }} .htx-ranker-item {{ white-space: pre-wrap }}</Style>
  <Header value="The prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Rank the responses: drag each into a column, best on the left. Responses in one column are tied."/>
  <List name="responses" value="$responses" title="Responses"/>
  <Ranker name="{RANKER}" toName="responses">
{buckets}
  </Ranker>
  <Header value="Flag the responses that..."/>
{flags}
  <TextArea name="{COMMENT}" toName="prompt" placeholder="Optional comment" rows="2" maxSubmissions="1"/>
</View>"""


def title(level: int, k: int) -> str:
    return f"{level + 1} (best)" if level == 0 else f"{level + 1} (worst)" if level == k - 1 else str(level + 1)


def demonstration_config() -> str:
    """The demonstration page: write the response you would want to the prompt."""
    return f"""<View>
  <Header value="The prompt"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Write the response you would want an assistant to give:"/>
  <TextArea name="{DEMONSTRATION}" toName="prompt" rows="8" required="true" maxSubmissions="1"/>
</View>"""
