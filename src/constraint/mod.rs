//! Constrained decoding: a regex, a JSON schema, a grammar or a forced tool call becomes a
//! token mask applied to the logits before every sample, so each token keeps the output valid,
//! and the completion ends as soon as the constraint is complete. llguidance does the work.
//!
//! Compiling happens for the HTTP thread that parsed the request (never on the engine thread),
//! and compiled constraints are cached, so a repeated schema costs one clone.
//!
//! What a client can make a constraint cost is bounded three ways: its source is at most
//! `max_bytes` long (refused before any work), llguidance's fuel limits (`LIMITS`) stop a
//! grammar that blows up when compiled or at any one token, and compiling runs on a thread
//! whose stack holds the deepest grammar `max_bytes` allows (llguidance's Lark compiler
//! recurses once per rule a rule refers to: 1,000 chained rules overflow a 2 MiB stack).

mod gbnf;
mod vocabulary;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use crate::text::Tokenizer;

/// What a request asks its output to be.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    /// SGLang's `regex`: the whole completion matches it.
    Regex(String),
    /// `response_format: {"type": "json_object"}`.
    JsonObject,
    /// `response_format: {"type": "json_schema", ...}`, or a forced tool call's schema.
    JsonSchema(Value),
    /// JSON valid against `schema`, between fixed text: a forced tool call in the model's own
    /// format (its markers around the call).
    JsonBetween { before: Vec<Literal>, schema: Value, after: Vec<Literal> },
    /// `before`, then one of `calls`' names, `between`, and JSON valid against that name's
    /// schema: a forced tool call written as Mistral's newer models write one
    /// (`[TOOL_CALLS]name[ARGS]{...}`).
    NamedJson { before: Vec<Literal>, between: Literal, calls: Vec<(String, Value)> },
    /// `grammar`: llguidance's Lark dialect.
    Lark(String),
    /// SGLang's `ebnf`: GBNF (`root ::= ...`), converted to Lark.
    Gbnf(String),
}

impl Spec {
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Spec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Spec::JsonObject => TopLevelGrammar::from_json_schema(strict_json(json!({"type": "object"}))),
            Spec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(strict_json(schema.clone())),
            Spec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
            Spec::Gbnf(text) => TopLevelGrammar::from_lark(gbnf::to_lark(text)?),
            Spec::JsonBetween { before, schema, after } => TopLevelGrammar::from_lark(format!(
                "start: {} json {}\njson: %json {}",
                lark(before),
                lark(after),
                strict_json(schema.clone())
            )),
            Spec::NamedJson { before, between, calls } => {
                let (mut choices, mut rules) = (Vec::new(), String::new());
                for (i, (name, schema)) in calls.iter().enumerate() {
                    let name = Literal { text: name.clone(), token: None }.lark();
                    choices.push(format!("{name} {} json{i}", between.lark()));
                    rules += &format!("json{i}: %json {}\n", strict_json(schema.clone()));
                }
                TopLevelGrammar::from_lark(format!("start: {} ({})\n{rules}", lark(before), choices.join(" | ")))
            }
        })
    }

    /// Bytes of the constraint's source as the client wrote it (a schema as compact JSON).
    fn source_len(&self) -> usize {
        match self {
            Spec::Regex(text) | Spec::Lark(text) | Spec::Gbnf(text) => text.len(),
            Spec::JsonObject => 0,
            Spec::JsonSchema(schema) | Spec::JsonBetween { schema, .. } => json_len(schema),
            Spec::NamedJson { calls, .. } => calls.iter().map(|(name, schema)| name.len() + json_len(schema)).sum(),
        }
    }

    fn cache_key(&self) -> String {
        match self {
            Spec::Regex(rx) => format!("regex\0{rx}"),
            Spec::JsonObject => "json_object".into(),
            Spec::JsonSchema(schema) => format!("schema\0{schema}"),
            Spec::Lark(lark) => format!("lark\0{lark}"),
            Spec::Gbnf(text) => format!("gbnf\0{text}"),
            Spec::JsonBetween { before, schema, after } => format!("between\0{before:?}\0{schema}\0{after:?}"),
            Spec::NamedJson { before, between, calls } => format!("named\0{before:?}\0{between:?}\0{calls:?}"),
        }
    }
}

/// Fixed text in a constraint: a token of the vocabulary where it is one (a model's special
/// marker must be that token, not its spelling), else the text.
#[derive(Clone, Debug, PartialEq)]
pub struct Literal {
    pub text: String,
    pub token: Option<u32>,
}

/// Fixed pieces in a row, in Lark.
fn lark(pieces: &[Literal]) -> String {
    pieces.iter().map(Literal::lark).collect::<Vec<_>>().join(" ")
}

impl Literal {
    fn lark(&self) -> String {
        match self.token {
            Some(id) => format!("<[{id}]>"),
            // A JSON string is a Lark string literal.
            None => Value::String(self.text.clone()).to_string(),
        }
    }
}

/// Bytes of `value` written as compact JSON, without writing it anywhere.
pub fn json_len(value: &Value) -> usize {
    let mut counter = ByteCounter(0);
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// Refuses a constraint source of `size` bytes over `max_bytes` (or `MAX_SOURCE_BYTES`).
pub fn check_size(size: usize, max_bytes: usize) -> Result<(), String> {
    let max_bytes = max_bytes.min(MAX_SOURCE_BYTES);
    if size > max_bytes {
        return Err(format!("it is {size} bytes long; this server compiles constraints of at most {max_bytes} bytes"));
    }
    Ok(())
}

/// Counts what is written to it.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// JSON without free whitespace: a small model cannot wander into blank lines.
fn strict_json(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        let guidance = map.entry("x-guidance").or_insert_with(|| json!({}));
        if let Value::Object(g) = guidance {
            g.entry("whitespace_flexible").or_insert(Value::Bool(false));
        }
    }
    schema
}

/// A compiled constraint, ready to be cloned into each sequence that follows it.
#[derive(Clone)]
pub struct Prepared {
    matcher: Arc<Matcher>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepared constraint")
    }
}

impl Prepared {
    /// A fresh state for one sequence.
    pub fn start(&self) -> Constraint {
        Constraint { matcher: self.matcher.deep_clone() }
    }
}

/// Compiles constraints for one tokenizer and keeps the most recent ones.
pub struct Compiler {
    cache: Mutex<VecDeque<(String, Prepared)>>,
    /// Compilations for the threads below; `None` once dropped, which ends them.
    jobs: Option<crossbeam_channel::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// A compilation asked of the compiling threads, and where its result goes.
type Job = (Spec, crossbeam_channel::Sender<Result<Prepared, String>>);

/// Threads that compile. Their stacks hold the deepest grammar allowed, and however many HTTP
/// threads ask, no more compilations than this run at once.
const COMPILE_THREADS: usize = 2;

/// Compiled constraints kept for reuse.
const CACHE_ENTRIES: usize = 64;

/// A compiling thread's stack: room for the deepest rule chain a source of
/// `MAX_SOURCE_BYTES` can write (tested by `the_deepest_grammars_allowed_compile`). Only the
/// pages a compilation touches become resident.
const COMPILE_STACK_BYTES: usize = 256 << 20;

/// The largest `max_bytes` a server may set: what `COMPILE_STACK_BYTES` is sized for.
pub const MAX_SOURCE_BYTES: usize = 64 << 10;

/// llguidance's budgets, lower than its defaults (which allow ~20 ms of lexer work at start,
/// ~15 ms per token and up to 250,000 lexer states of 1-2 kB each) so that no constraint can
/// hold an HTTP thread or a decode step for long, or take hundreds of megabytes: measured in
/// README "Limits".
fn limits() -> llguidance::api::ParserLimits {
    llguidance::api::ParserLimits {
        initial_lexer_fuel: 200_000,
        step_lexer_fuel: 100_000,
        step_max_items: 20_000,
        max_lexer_states: 20_000,
        max_grammar_size: 100_000,
        // The message names the limit; the parser state and grammar would echo the request.
        verbose_errors: false,
        ..Default::default()
    }
}

impl Compiler {
    /// `eos` are the model's end-of-sequence ids (allowed once the constraint is complete);
    /// `vocab_size` is the width of the model's logits.
    pub fn new(tokenizer: &Arc<Tokenizer>, eos: &[u32], vocab_size: usize) -> Result<Self> {
        let env = vocabulary::Vocabulary::env(tokenizer, eos, vocab_size)?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| anyhow!("preparing constraints: {e}"))?;
        factory.quiet();
        *factory.limits_mut() = limits();
        let factory = Arc::new(factory);
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let threads = (0..COMPILE_THREADS)
            .map(|i| {
                let (factory, queue) = (factory.clone(), queue.clone());
                std::thread::Builder::new()
                    .name(format!("chatd-compile-{i}"))
                    .stack_size(COMPILE_STACK_BYTES)
                    .spawn(move || {
                        for (spec, reply) in queue {
                            // A panic in llguidance fails this compilation, not the thread.
                            let compile = std::panic::AssertUnwindSafe(|| compile_here(&factory, &spec));
                            let result = std::panic::catch_unwind(compile)
                                .unwrap_or_else(|_| Err("the constraint compiler failed".into()));
                            let _ = reply.send(result);
                        }
                    })
                    .map_err(|e| anyhow!("starting a constraint compiling thread: {e}"))
            })
            .collect::<Result<_>>()?;
        Ok(Self { cache: Mutex::new(VecDeque::new()), jobs: Some(jobs), threads })
    }

    /// Compiles `spec`, or returns the cached compilation; the error is the compiler's message.
    /// A source over `max_bytes` is refused before anything else.
    pub fn compile(&self, spec: &Spec, max_bytes: usize) -> Result<Prepared, String> {
        let size = spec.source_len();
        check_size(size, max_bytes)?;
        let key = spec.cache_key();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = cache.iter().position(|(k, _)| *k == key) {
                let entry = cache.remove(i).expect("index in range");
                let prepared = entry.1.clone();
                cache.push_front(entry);
                return Ok(prepared);
            }
        }
        let started = std::time::Instant::now();
        let (reply, result) = crossbeam_channel::bounded(1);
        let jobs = self.jobs.as_ref().expect("compiling threads run until the compiler is dropped");
        let prepared = match jobs.send((spec.clone(), reply)) {
            Ok(()) => result.recv().unwrap_or_else(|_| Err("the constraint compiler failed".into())),
            Err(_) => Err("the constraint compiler has stopped".into()),
        };
        log::debug!("compiling a constraint of {size} bytes took {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
        let prepared = prepared?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.push_front((key, prepared.clone()));
        cache.truncate(CACHE_ENTRIES);
        Ok(prepared)
    }
}

impl Drop for Compiler {
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn compile_here(factory: &ParserFactory, spec: &Spec) -> Result<Prepared, String> {
    let parser = factory.create_parser(spec.grammar()?).map_err(|e| e.to_string())?;
    let mut matcher = Matcher::new(Ok(parser));
    // Building the first mask compiles the lexer: a grammar that cannot even start fails here.
    matcher.compute_mask().map_err(|e| e.to_string())?;
    if let Some(error) = matcher.get_error() {
        return Err(error);
    }
    Ok(Prepared { matcher: Arc::new(matcher) })
}

/// A constraint that could not go on while generating: a budget of llguidance's ran out at
/// one token (a grammar too ambiguous or a lexer too large), or nothing is allowed. The
/// request's own doing, so a client error, not the engine's.
#[derive(Debug)]
pub struct Failed(pub String);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request's constraint could not be followed: {}", self.0)
    }
}

impl std::error::Error for Failed {}

/// One sequence's progress through its constraint.
pub struct Constraint {
    matcher: Matcher,
}

/// What the constraint allows next.
pub enum Next {
    /// Sample among the tokens left in the logits (the rest were set to -inf).
    Sample,
    /// The constraint is complete: end the completion here.
    Complete,
}

impl Constraint {
    /// Masks `logits` to the tokens that keep the output valid (end-of-sequence only where the
    /// constraint is complete).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<Next> {
        if self.matcher.is_stopped() {
            return Ok(Next::Complete);
        }
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| Failed(e.to_string()))?;
        if mask.is_zero() {
            return Err(Failed("it allows no token here".into()).into());
        }
        mask.iter_unset_entries(|t| {
            if let Some(l) = logits.get_mut(t) {
                *l = f32::NEG_INFINITY;
            }
        });
        Ok(Next::Sample)
    }

    /// Records a sampled (non end-of-sequence) token.
    pub fn consume(&mut self, token: u32) -> Result<()> {
        Ok(self.matcher.consume_token(token).map_err(|e| Failed(e.to_string()))?)
    }

    /// Whether nothing more can follow (the completion must end).
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::smollm_tokenizer;

    fn compiler() -> Compiler {
        let tokenizer = Arc::new(smollm_tokenizer());
        Compiler::new(&tokenizer, &[2], tokenizer.vocab_size()).unwrap()
    }

    /// Distinct short rule names: a, b, ..., z, aa, ab, ...
    fn names() -> impl Iterator<Item = String> {
        (1usize..).map(|mut n| {
            let mut name = String::new();
            while n > 0 {
                n -= 1;
                name.insert(0, (b'a' + (n % 26) as u8) as char);
                n /= 26;
            }
            name
        })
    }

    /// Rules that each refer to the next, as many as fit in `bytes`: the deepest recursion a
    /// source of that size can cause in llguidance's grammar compiler.
    fn chain(bytes: usize, rule: impl Fn(&str, &str) -> String, start: &str, last: impl Fn(&str) -> String) -> String {
        let mut names = names();
        let mut current = names.next().unwrap();
        let mut out = start.replace("{}", &current);
        loop {
            let next = names.next().unwrap();
            let line = rule(&current, &next);
            if out.len() + line.len() + last(&next).len() > bytes {
                break;
            }
            out += &line;
            current = next;
        }
        out + &last(&current)
    }

    #[test]
    fn the_deepest_grammars_allowed_compile() {
        let compiler = compiler();
        let lark =
            chain(MAX_SOURCE_BYTES, |a, b| format!("{a}: \"x\" {b}\n"), "start: {}\n", |a| format!("{a}: \"z\"\n"));
        let gbnf = chain(
            MAX_SOURCE_BYTES,
            |a, b| format!("{a} ::= \"x\" {b}\n"),
            "root ::= {}\n",
            |a| format!("{a} ::= \"z\"\n"),
        );
        assert!(lark.matches('\n').count() > 4000, "{} rules", lark.matches('\n').count());
        // On a 2 MiB stack (an HTTP thread's) the first of these overflows and aborts.
        compiler.compile(&Spec::Lark(lark), MAX_SOURCE_BYTES).unwrap();
        compiler.compile(&Spec::Gbnf(gbnf), MAX_SOURCE_BYTES).unwrap();
        let mut defs = serde_json::Map::new();
        let mut names = names();
        let (first, mut current) = {
            let n = names.next().unwrap();
            (n.clone(), n)
        };
        while json_len(&Value::Object(defs.clone())) < MAX_SOURCE_BYTES - 200 {
            let next = names.next().unwrap();
            defs.insert(current.clone(), json!({"$ref": format!("#/$defs/{next}")}));
            current = next;
        }
        defs.insert(current, json!({"type": "integer"}));
        let schema = json!({"$ref": format!("#/$defs/{first}"), "$defs": defs});
        compiler.compile(&Spec::JsonSchema(schema), MAX_SOURCE_BYTES).unwrap();
    }

    #[test]
    fn sources_over_the_limit_are_refused_before_compiling() {
        let compiler = compiler();
        let e = compiler.compile(&Spec::Regex("a".repeat(101)), 100).err().unwrap();
        assert!(e.contains("101 bytes") && e.contains("at most 100"), "{e}");
        let schema = json!({"enum": ["x".repeat(200)]});
        let e = compiler.compile(&Spec::JsonSchema(schema), 100).err().unwrap();
        assert!(e.contains("at most 100"), "{e}");
        // The server's setting cannot raise the limit past what the stack is sized for.
        let e = compiler.compile(&Spec::Regex("a".repeat(MAX_SOURCE_BYTES + 1)), usize::MAX).err().unwrap();
        assert!(e.contains(&format!("at most {MAX_SOURCE_BYTES}")), "{e}");
    }

    #[test]
    fn budgets_stop_grammars_that_blow_up() {
        let compiler = compiler();
        // Ambiguous enough to exceed the Earley items allowed at one token once started.
        let wide = format!("start: {}", (0..2500).map(|i| format!("\"w{i}\"")).collect::<Vec<_>>().join(" | "));
        let prepared = compiler.compile(&Spec::Lark(wide), MAX_SOURCE_BYTES).unwrap();
        let mut constraint = prepared.start();
        let mut logits = vec![0.0; 49152];
        let w = smollm_tokenizer().token_id("w").unwrap();
        constraint.mask(&mut logits).unwrap();
        let failure = constraint.consume(w).and_then(|()| constraint.mask(&mut logits).map(|_| ()));
        let error = failure.expect_err("the budget of Earley items per token was not enforced");
        assert!(error.downcast_ref::<Failed>().is_some() && error.to_string().contains("items"), "{error:#}");
    }
}
