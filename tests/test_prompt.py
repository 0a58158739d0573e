"""The prompt rules per task, as pure functions, and the chat text the model's template makes."""

from __future__ import annotations

import pytest

from qwenbatch import schema
from qwenbatch.config import TaskConfig
from qwenbatch.prompt import PromptError, chat_messages, instruction_for, template_fields


def test_caption_uses_default_or_row_prompt():
    task = TaskConfig(kind="caption")
    assert instruction_for(task, {}) == schema.DEFAULT_PROMPTS["caption"]
    assert instruction_for(task, {"prompt": "  Name the animal.  "}) == "Name the animal."
    assert instruction_for(task, {"prompt": "   "}) == schema.DEFAULT_PROMPTS["caption"]
    assert instruction_for(TaskConfig(kind="caption", prompt="Alt text, please."), {}) == "Alt text, please."


def test_document_has_its_own_instruction():
    assert instruction_for(TaskConfig(kind="document"), {}) == schema.DEFAULT_PROMPTS["document"]


def test_vqa_needs_a_question():
    task = TaskConfig(kind="vqa")
    assert instruction_for(task, {"question": "How many cats?"}) == "How many cats?"
    for row in ({}, {"question": None}, {"question": "  "}):
        with pytest.raises(PromptError, match="no question in column 'question'"):
            instruction_for(task, row)


def test_custom_template_fills_columns():
    task = TaskConfig(kind="custom", prompt="Is there a {object} in {place}?")
    assert template_fields(task.prompt) == ["object", "place"]
    assert instruction_for(task, {"object": "cat", "place": "the garden"}) == "Is there a cat in the garden?"
    with pytest.raises(PromptError, match="needs column 'place'"):
        instruction_for(task, {"object": "cat"})
    with pytest.raises(PromptError, match="'place' is null"):
        instruction_for(task, {"object": "cat", "place": None})


def test_template_fields_must_be_plain_columns():
    with pytest.raises(ValueError, match="plain column name"):
        template_fields("{row.attr}")


def test_chat_text_from_the_models_template(tiny_model):
    from qwenbatch.hub import load_processor

    processor = load_processor(str(tiny_model), None)
    task = TaskConfig(kind="caption", system="Be brief.")
    chat = processor.apply_chat_template(chat_messages(task, "Describe."), tokenize=False, add_generation_prompt=True)
    assert chat == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert processor.tokenizer.padding_side == "left"
