use anyhow::{Context, Result};
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, Value, context};

/// The model's own chat template, rendered the way Hugging Face's `apply_chat_template` does:
/// Jinja with `trim_blocks` and `lstrip_blocks`, Python string/dict/list methods, and the
/// `raise_exception` and `strftime_now` helpers that hub templates call.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .context("configuring template syntax")?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned()).context("compiling the chat template")?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_owned(),
            eos_token: eos_token.unwrap_or_default().to_owned(),
        })
    }

    /// Renders `messages` (OpenAI message objects whose `content` is already a string) and,
    /// when given, `tools` (OpenAI tool objects), as Hugging Face passes them to the template.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        kwargs: Option<&serde_json::Value>,
    ) -> Result<String, Error> {
        let template = self.env.get_template(NAME)?;
        // As transformers' `apply_chat_template(**kwargs)`: extra variables (`enable_thinking`,
        // ...), which never replace the ones named here.
        let extra = kwargs.map_or(Value::UNDEFINED, |k| Value::from(Serde(k)));
        template.render(context! {
            messages => Value::from(Serde(messages)),
            tools => tools.map(|t| Value::from(Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            ..extra
        })
    }
}

/// `strftime_now(format)`: the current UTC time formatted with the common strftime codes.
fn strftime_now(format: String) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    let (hour, minute, second) = (rem / 3600, rem / 60 % 60, rem % 60);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tokenizer::tests::smollm_tokenizer;
    use serde_json::json;

    fn smollm_template() -> (ChatTemplate, crate::text::Tokenizer) {
        let tok = smollm_tokenizer();
        let t = ChatTemplate::new(
            tok.chat_template.as_deref().unwrap(),
            tok.bos_token.as_deref(),
            tok.eos_token.as_deref(),
        )
        .unwrap();
        (t, tok)
    }

    #[test]
    fn france_prompt_renders_to_the_pinned_37_token_ids() {
        let (template, tok) = smollm_template();
        let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
        let prompt = template.render(&messages, None, true, None).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = tok.encode(&prompt).unwrap();
        assert_eq!(ids.len(), 37);
        assert_eq!(&ids[..5], &[1, 9690, 198, 2683, 359]);
        assert_eq!(&ids[31..], &[2, 198, 1, 520, 9531, 198]);
    }

    #[test]
    fn system_message_replaces_the_default_and_generation_prompt_is_optional() {
        let (template, _) = smollm_template();
        let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
        let prompt = template.render(&messages, None, false, None).unwrap();
        assert_eq!(prompt, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn python_methods_raise_exception_and_tools_work_like_hugging_face() {
        let source = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}\
            {% for m in messages %}{{ m['content'].strip().upper() }}|{% endfor %}\
            {% if tools %}{{ tools | length }} tools: {{ tools[0].function.name }}{% endif %}{{ bos_token }}";
        let t = ChatTemplate::new(source, Some("<s>"), Some("</s>")).unwrap();
        let out = t
            .render(
                &json!([{"role": "user", "content": "  hi  "}]),
                Some(&json!([{"type": "function", "function": {"name": "f"}}])),
                true,
                None,
            )
            .unwrap();
        assert_eq!(out, "HI|1 tools: f<s>");
        let err = t.render(&json!([{"role": "system", "content": "x"}]), None, true, None).unwrap_err();
        assert!(err.to_string().contains("no system"), "{err}");
    }

    #[test]
    fn trim_and_lstrip_blocks_match_jinja2_defaults_of_hugging_face() {
        let source = "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        assert_eq!(t.render(&json!([{"content": "a"}, {"content": "b"}]), None, true, None).unwrap(), "    a\n    b\n");
    }

    #[test]
    fn template_kwargs_add_variables_but_replace_none_of_the_named_ones() {
        let source = "{% if enable_thinking is defined and not enable_thinking %}no-think {% endif %}\
            {{ messages | length }} {{ add_generation_prompt }}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        let messages = json!([{"role": "user", "content": "a"}]);
        assert_eq!(t.render(&messages, None, true, None).unwrap(), "1 True");
        let kwargs = json!({"enable_thinking": false, "messages": [], "add_generation_prompt": false});
        assert_eq!(t.render(&messages, None, true, Some(&kwargs)).unwrap(), "no-think 1 True");
    }

    #[test]
    fn strftime_now_knows_the_calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert!(strftime_now("%d %B %Y".into()).len() >= 11);
    }
}
