//! Chat templates: the Jinja text a model ships (tokenizer_config.json or GGUF metadata),
//! rendered with minijinja plus Python-compatible string methods.

use anyhow::{anyhow, Result};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    fn to_value(&self) -> minijinja::Value {
        minijinja::Value::from_pairs([
            ("role", minijinja::Value::from(self.role.as_str())),
            ("content", minijinja::Value::from(self.content.as_str())),
        ])
    }

    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Renders `template` the way transformers' `apply_chat_template(..., tokenize=False)` does.
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    // HF renders with trim_blocks and lstrip_blocks on.
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| anyhow!("{e}"))?,
    );
    env.add_template("chat", template)
        .map_err(|e| anyhow!("chat template does not parse: {e}"))?;
    let tmpl = env.get_template("chat").expect("just added");
    tmpl.render(minijinja::context! {
        messages => messages.iter().map(ChatMessage::to_value).collect::<Vec<_>>(),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| anyhow!("chat template failed to render: {e}"))
}
