"""Chat templates for targets whose tokenizer ships none, selectable by name (``target.chat_template``,
``data.chat_template``). Written from the model cards' documented prompt formats."""

NAMED_TEMPLATES = {
    # Vicuna v1.1+ (used by v1.3): system line, then " USER: ..." / " ASSISTANT: ...</s>" turns.
    "vicuna": (
        "{% for message in messages %}{% if loop.first %}{% if message['role'] == 'system' %}"
        "{{ message['content'] }}{% else %}{{ 'A chat between a curious user and an artificial intelligence "
        "assistant. The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' }}"
        "{% endif %}{% endif %}{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
    ),
}
