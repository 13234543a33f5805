//! GBNF (llama.cpp's grammar format, which SGLang's `ebnf` field also takes) rewritten as the
//! Lark dialect llguidance reads: `name ::= body` becomes `name: body` on one line, `root`
//! becomes `start`, `[...]` classes become `/[...]/` regexes, `-` in names becomes `_`, and
//! `#` comments go. Strings, alternatives, groups and repetitions carry over unchanged.

pub fn to_lark(text: &str) -> Result<String, String> {
    let tokens = tokenize(text)?;
    let mut rules: Vec<(String, Vec<String>)> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if let (Token::Name(name), Some(Token::Defines)) = (&tokens[i], tokens.get(i + 1)) {
            rules.push((rule_name(name), Vec::new()));
            i += 2;
            continue;
        }
        let Some((_, body)) = rules.last_mut() else {
            return Err("the grammar must start with a rule definition like `root ::= ...`".into());
        };
        body.push(match &tokens[i] {
            Token::Name(name) => rule_name(name),
            Token::Defines => return Err("`::=` without a rule name before it".into()),
            Token::Other(text) => text.clone(),
        });
        i += 1;
    }
    if !rules.iter().any(|(name, _)| name == "start") {
        return Err("the grammar has no `root` rule".into());
    }
    if let Some((name, _)) = rules.iter().find(|(_, body)| body.is_empty()) {
        return Err(format!("the rule `{name}` is empty"));
    }
    Ok(rules.iter().map(|(name, body)| format!("{name}: {}\n", join(body))).collect())
}

/// Joins a rule's tokens with spaces, except before a repetition and inside parentheses.
fn join(body: &[String]) -> String {
    let mut out = String::new();
    for (i, token) in body.iter().enumerate() {
        let glued = token.starts_with(['*', '+', '?', '{', ')']) || (i > 0 && body[i - 1] == "(");
        if i > 0 && !glued {
            out.push(' ');
        }
        out.push_str(token);
    }
    out
}

enum Token {
    Name(String),
    Defines,
    Other(String),
}

fn rule_name(name: &str) -> String {
    if name == "root" { "start".into() } else { name.replace('-', "_").to_lowercase() }
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '"' => {
                let end = closing(&chars, i, '"', "a string literal")?;
                tokens.push(Token::Other(chars[i..end].iter().collect()));
                i = end;
            }
            '[' => {
                let end = closing(&chars, i, ']', "a character class `[...]`")?;
                let class: String = chars[i..end].iter().collect();
                tokens.push(Token::Other(format!("/{}/", class.replace('/', "\\/"))));
                i = end;
            }
            ':' if chars.get(i + 1) == Some(&':') && chars.get(i + 2) == Some(&'=') => {
                tokens.push(Token::Defines);
                i += 3;
            }
            '{' => {
                let end = closing(&chars, i, '}', "a repetition `{m,n}`")?;
                tokens.push(Token::Other(chars[i..end].iter().collect()));
                i = end;
            }
            '|' | '(' | ')' | '*' | '+' | '?' => {
                tokens.push(Token::Other(c.to_string()));
                i += 1;
            }
            c if c.is_ascii_alphanumeric() || c == '_' || c == '-' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '-') {
                    i += 1;
                }
                tokens.push(Token::Name(chars[start..i].iter().collect()));
            }
            other => return Err(format!("unexpected character {other:?} in the grammar")),
        }
    }
    Ok(tokens)
}

/// The index just past the `close` that ends the literal opened at `open` (backslash escapes
/// skipped).
fn closing(chars: &[char], open: usize, close: char, what: &str) -> Result<usize, String> {
    let mut i = open + 1;
    while i < chars.len() && chars[i] != close {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    if i >= chars.len() {
        return Err(format!("{what} is not closed"));
    }
    Ok(i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gbnf_becomes_lark() {
        let gbnf = "# yes or no\nroot ::= answer \".\"\nanswer ::= \"yes\" | \"no\"\n  | digit-list\ndigit-list ::= [0-9]+ (\",\" [0-9/])*\n";
        assert_eq!(
            to_lark(gbnf).unwrap(),
            "start: answer \".\"\nanswer: \"yes\" | \"no\" | digit_list\ndigit_list: /[0-9]/+ (\",\" /[0-9\\/]/)*\n"
        );
        assert!(to_lark("answer ::= \"x\"").unwrap_err().contains("root"));
        assert!(to_lark("root ::= \"x").unwrap_err().contains("not closed"));
        assert!(to_lark("\"x\" root ::= \"y\"").unwrap_err().contains("rule definition"));
    }
}
