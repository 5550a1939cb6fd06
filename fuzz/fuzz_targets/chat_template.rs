//! The chat-template renderer: a template (the input's first part) applied to a
//! conversation whose user message is the rest.
#![no_main]

use binllm_format::chat::{render, ChatMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (template, content) = binllm_fuzz::split_two(data);
    let (Ok(template), Ok(content)) = (std::str::from_utf8(template), std::str::from_utf8(content))
    else {
        return;
    };
    let messages = [
        ChatMessage::new("system", "You are brief."),
        ChatMessage::new("user", content),
    ];
    let _ = render(template, &messages, true, "<s>", "</s>");
});
