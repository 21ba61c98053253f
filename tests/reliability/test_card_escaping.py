"""Hostile class names, output directory names and options in the model card, the dataset card
and the plots: shown as the text they are, never as HTML, a link, emphasis or math, and never
breaking a heading, a table or the code snippet; the YAML front matter keeps the true values.

The model card and plots come from a real run (the tiny ViT trained 2 steps by
``LongTailTrainer``, saved and evaluated into a directory with a hostile name); the cards are
rendered with markdown-it (CommonMark + tables, raw HTML allowed: what a renderer that passes
HTML through would show) and inspected element by element.
"""

from __future__ import annotations

import ast
import re
from html.parser import HTMLParser

import pytest
from _reliability_helpers import COUNTS, eval_transform, image_dataset, tiny_vit, training_args

from hf_longtail import LongTailTrainer
from hf_longtail.data import collate_fn, with_transforms

HOSTILE_NAMES = [
    "<img src=x onerror=alert(1)>",
    "[click](http://evil)",
    "a\nb # heading",
    "``tick`` `x`",
    "a | b",
    r"$\notacommand$ **bold** _em_ ~~gone~~ www.evil.com me@evil.com &lt;script&gt;",
]
# A directory name cannot hold "/": the other tricks fit.
HOSTILE_DIR = "<img src=x onerror=alert(1)> [x](javascript:alert(1)) a\nb # heading `tick` | $x$"
HOSTILE_OPTION = "[x](http://evil) <b>bold</b>"
# A dataset source is published by its last path part: one without "/".
HOSTILE_SOURCE = "<img src=x onerror=alert(1)> [x](javascript:alert(1)) **bold**"
# The only links, images and headings the card may have: its own.
OUR_LINK = re.compile(r"^https://(github\.com/hf-longtail/|arxiv\.org/abs/|huggingface\.co/)")
MODEL_H2 = ["Results", "How to use", "Training procedure", "Limitations", "Citation"]


def _flat(text: str) -> str:
    return " ".join(text.split())


class _Html(HTMLParser):
    """Every tag with its attributes, the text of headings, table cells, code blocks and
    emphasis (bold, italics, strikethrough)."""

    BLOCKS = ("h1", "h2", "h3", "td", "th", "pre")
    INLINE = ("em", "strong", "del", "s")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.headings: list[tuple[str, str]] = []
        self.tables: list[list[list[str]]] = []
        self.code_blocks: list[str] = []
        self.emphasis: list[str] = []
        self._block: str | None = None
        self._inline: list[int] = []  # where each open inline element's text starts
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in self.BLOCKS:
            self._block, self._text = tag, []
        elif tag in self.INLINE:
            self._inline.append(len(self._text))

    def handle_endtag(self, tag):
        if tag in self.INLINE and self._inline:
            self.emphasis.append(_flat("".join(self._text[self._inline.pop() :])))
        elif tag == self._block:
            text, self._block = "".join(self._text), None
            if tag in ("td", "th"):
                self.tables[-1][-1].append(_flat(text))
            elif tag == "pre":
                self.code_blocks.append(text)
            else:
                self.headings.append((tag, _flat(text)))

    def handle_data(self, data):
        self._text.append(data)

    @property
    def rows(self) -> list[list[str]]:
        return [row for table in self.tables for row in table]


def _render(markdown_text: str) -> _Html:
    markdown_it = pytest.importorskip("markdown_it")
    md = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table")
    parsed = _Html()
    parsed.feed(md.render(markdown_text))
    return parsed


def _assert_inert(card_text: str, parsed: _Html, images: set[str]) -> None:
    """No HTML, link, image, emphasis or autolink came from the data."""
    tags = {tag for tag, _ in parsed.tags}
    assert not tags & {"script", "b", "del", "s"}, tags
    # The card's own emphasis only (its bold words), none from the data.
    assert not set(parsed.emphasis) & {"bold", "em", "gone"}, parsed.emphasis
    for tag, attrs in parsed.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "img":
            assert attrs["src"] in images, attrs
        if tag == "a":
            assert OUR_LINK.match(attrs["href"]), attrs
    # GFM autolinks bare URLs, e-mail addresses and www. names in text: none is left intact
    # outside code spans (where nothing is linked).
    outside_code = re.sub(r"^```.*?^```", "", card_text, flags=re.S | re.M)  # fenced blocks
    outside_code = re.sub(r"(`+)(?:(?!\1).)+\1", "", outside_code)  # code spans
    for bare in ("http://evil", "www.evil", "me@evil", "javascript:alert"):
        assert bare not in outside_code, bare
    assert "$x$" not in outside_code and r"$\notacommand$" not in outside_code  # no math


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / HOSTILE_DIR
    data = with_transforms(image_dataset(COUNTS, names=HOSTILE_NAMES), eval_transform())
    trainer = LongTailTrainer(
        model=tiny_vit(),
        args=training_args(out, max_steps=2),
        train_dataset=data,
        data_collator=collate_fn,
        loss_config={"base": "ce", "ccar": True, "car_weight": 0.5},
    )
    trainer.train()
    trainer.save_model()
    trainer.evaluate_and_save(data)  # plots and card with the hostile names
    return out


def test_model_card_shows_hostile_names_as_text_and_keeps_its_structure(hostile_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(hostile_run / "README.md")
    assert card.data.model_name == HOSTILE_DIR  # the front matter keeps the true value
    parsed = _render(card.text)
    _assert_inert(card.text, parsed, {"per_class_accuracy.png", "confusion_matrix.png"})
    h1 = [text for tag, text in parsed.headings if tag == "h1"]
    assert h1 == [_flat(HOSTILE_DIR)]  # one title, the whole name, as text
    h2 = [text for tag, text in parsed.headings if tag == "h2"]
    assert [h for h in h2 if not h.startswith("Training data")] == MODEL_H2
    assert not [h for h in h2 if "heading" in h]
    # Every table row has as many cells as its header; the per-class table names each class.
    assert len(parsed.tables) >= 5
    for table in parsed.tables:
        assert {len(row) for row in table} == {len(table[0])}, table
    by_label = {row[0]: row for row in parsed.rows if row[0].isdigit()}
    assert [by_label[str(i)][1] for i in range(len(COUNTS))] == [_flat(n) for n in HOSTILE_NAMES]
    # The snippet is valid Python that loads the model from the directory, by its true name.
    (snippet,) = [c for c in parsed.code_blocks if "from_pretrained" in c]
    calls = [n for n in ast.walk(ast.parse(snippet)) if isinstance(n, ast.Call)]
    loaded = [c.args[0].value for c in calls if getattr(c.func, "attr", "") == "from_pretrained"]
    assert loaded == [f"path/to/{HOSTILE_DIR}"]


def test_card_options_are_escaped_too(hostile_run):
    from hf_longtail.hub import build_model_card

    card = build_model_card(
        hostile_run, base_model=HOSTILE_OPTION, dataset_repo_id=HOSTILE_OPTION, license="mit"
    )
    assert card.data.base_model == HOSTILE_OPTION  # YAML-quoted, not Markdown-escaped
    parsed = _render(card.text)
    _assert_inert(card.text, parsed, {"per_class_accuracy.png", "confusion_matrix.png"})
    text = _flat(" ".join(t for _, t in parsed.headings) + card.text)
    assert "fine-tuned from" in text


def test_plots_draw_hostile_names_as_text(hostile_run):
    from hf_longtail.metrics.plots import plot_confusion_matrix, plot_per_class_accuracy

    assert (hostile_run / "per_class_accuracy.png").stat().st_size > 0
    fig = plot_per_class_accuracy([0.5] * len(COUNTS), COUNTS, None, class_names=HOSTILE_NAMES)
    fig.canvas.draw()  # mathtext would fail here on "$\notacommand$"
    ticks = fig.axes[0].get_xticklabels()
    assert {t.get_text() for t in ticks} == set(HOSTILE_NAMES)
    assert not any(t.get_parse_math() for t in ticks)
    fig = plot_confusion_matrix(
        [[1] * len(COUNTS)] * len(COUNTS), None, class_names=HOSTILE_NAMES, title="$x$ & co"
    )
    fig.canvas.draw()
    assert not fig.axes[0].title.get_parse_math()
    assert not any(t.get_parse_math() for t in fig.axes[0].get_yticklabels())


def test_dataset_card_shows_hostile_names_and_source_as_text():
    from datasets import DatasetDict
    from huggingface_hub import DatasetCard

    from hf_longtail.hub import build_dataset_card, dataset_card_counts

    data = DatasetDict(
        {
            "train": image_dataset(COUNTS, names=HOSTILE_NAMES),
            "test": image_dataset((2,) * 6, names=HOSTILE_NAMES),
        }
    )
    card = build_dataset_card(
        data, "me/lt", source=HOSTILE_SOURCE, imbalance_factor=10, profile="exp", seed=0
    )
    reloaded = DatasetCard(str(card))
    assert reloaded.data.long_tail["class_names"] == HOSTILE_NAMES  # true values
    assert reloaded.data.long_tail["source"] == HOSTILE_SOURCE
    assert dataset_card_counts(reloaded) == list(COUNTS)
    parsed = _render(reloaded.text)
    _assert_inert(reloaded.text, parsed, set())
    assert [t for tag, t in parsed.headings if tag == "h1"] == [_flat(reloaded.data.pretty_name)]
    by_label = {row[0]: row for row in parsed.rows if row[0].isdigit()}
    assert [by_label[str(i)][1] for i in range(len(COUNTS))] == [_flat(n) for n in HOSTILE_NAMES]
    for table in parsed.tables:
        assert {len(row) for row in table} == {len(table[0])}, table
    (snippet,) = [c for c in parsed.code_blocks if "load_dataset" in c]
    ast.parse(snippet)


def test_ordinary_names_stay_readable_in_the_card_source():
    from hf_longtail.hub.escape import md_code, md_text

    assert md_text("digit 7") == "digit 7" and md_text("> 100 images") == "> 100 images"
    assert md_text("class_0") == "class_0" and md_code("class_0") == "`class_0`"
    assert md_text("_em_ a_") == r"\_em\_ a\_" and md_text("a__b") == "a__b"
    assert md_code("a`b") == "``a`b``" and md_code("`x") == "`` `x ``"
