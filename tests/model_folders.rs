//! Model folders as today's exporters and hubs write them: templates in their several forms,
//! and where a template takes the request's tools. Each folder is the shared SmolLM2 model
//! (files linked) with a tokenizer config or template of another family's shape.

mod common;

use std::path::{Path, PathBuf};

use common::{Daemon, model_dir, user};
use serde_json::{Value, json};

/// A folder linking the shared model's files, with `tokenizer_config.json` replaced by
/// `config` and `extra` files written beside.
fn folder(name: &str, config: &Value, extra: &[(&str, &str)]) -> PathBuf {
    let config = config.to_string();
    let written: Vec<(&str, &str)> =
        [("tokenizer_config.json", config.as_str())].into_iter().chain(extra.iter().copied()).collect();
    common::linked_model_folder(name, &written)
}

fn tokenizer_config(template: Value) -> Value {
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir().join("tokenizer_config.json")).unwrap()).unwrap();
    match template {
        Value::Null => config.as_object_mut().unwrap().remove("chat_template"),
        t => config.as_object_mut().unwrap().insert("chat_template".into(), t),
    };
    config
}

const WEATHER: &str = r#"[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]"#;

fn rendered(d: &Daemon, body: Value) -> String {
    let r = d.post("/apply-template", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["prompt"].as_str().unwrap().to_owned()
}

fn remove(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_list_of_named_templates_uses_tool_use_when_tools_are_given() {
    // transformers: `chat_template` as [{"name", "template"}]; "tool_use" is chosen for tools.
    let config = tokenizer_config(json!([
        {"name": "default", "template": "D:{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}{{ tools[0].function.name }}:{{ messages[-1]['content'] }}"},
    ]));
    let dir = folder("list", &config, &[]);
    let d = Daemon::start_with_model(&dir, &[]);
    let tools: Value = serde_json::from_str(WEATHER).unwrap();
    assert_eq!(rendered(&d, json!({"messages": user("hi")})), "D:hi");
    assert_eq!(rendered(&d, json!({"messages": user("hi"), "tools": tools})), "T1get_weather:hi");
    drop(d);
    remove(&dir);
}

#[test]
fn tools_a_template_takes_but_leaves_out_reach_the_prompt_as_chatds_own() {
    // The template reads `tools` only to count them: the model would never see them.
    let template = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}{{ tools | length }}";
    let dir = folder("leaves-out", &tokenizer_config(json!(template)), &[]);
    let d = Daemon::start_with_model(&dir, &[]);
    let tools: Value = serde_json::from_str(WEATHER).unwrap();
    let prompt = rendered(&d, json!({"messages": user("hi"), "tools": tools}));
    assert!(prompt.starts_with("[system:You are a function calling AI model."), "{prompt}");
    assert!(prompt.contains("\"get_weather\"") && prompt.ends_with("[user:hi]1"), "{prompt}");
    // Only when they are offered.
    let none = rendered(&d, json!({"messages": user("hi"), "tools": tools, "tool_choice": "none"}));
    assert_eq!(none, "[user:hi]1");
    drop(d);
    remove(&dir);
}

/// A chat template of `tools_part`'s family: the messages in SmolLM2's own form (so the model
/// answers sensibly), then the tools and the family's way of writing a call.
fn calling_template(tools_part: &str) -> String {
    format!(
        "{{% for m in messages %}}<|im_start|>{{{{ m['role'] }}}}\n{{{{ m['content'] }}}}<|im_end|>\n{{% endfor %}}\
         {{% if tools %}}<tools>{{{{ tools | tojson }}}}</tools> {tools_part}{{% endif %}}<|im_start|>assistant\n"
    )
}

/// A forced call through a folder with `template`: answered as a call, its generated tokens
/// starting with `starts` and ending with `ends`, and streamed to the same arguments.
fn forced_call_round_trip(name: &str, template: &str, starts: &str, ends: &str) {
    let dir = folder(name, &tokenizer_config(json!(template)), &[]);
    let d = Daemon::start_with_model(&dir, &[]);
    // A bounded city: the whole call fits max_tokens whatever the model picks.
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]);
    let body = json!({"messages": user("Weather in Rome?"), "tools": tools, "tool_choice": "required",
        "max_tokens": 60, "temperature": 0});
    let v = d.chat(body.clone());
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let call = &choice["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather", "{v}");
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string() && arguments.as_object().unwrap().len() == 1, "{v}");
    // The markers were generated: they are in the completion's tokens.
    let mut with_logprobs = body.clone();
    with_logprobs["logprobs"] = json!(true);
    let plain = d.chat(with_logprobs);
    let tokens: String = plain["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert!(tokens.starts_with(starts) && tokens.ends_with(ends), "{tokens}");
    // Streamed, the arguments add up to the same text, without the markers.
    let mut stream = body;
    stream["stream"] = json!(true);
    let r = d.post("/v1/chat/completions", &stream);
    let streamed: String = r
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(streamed, call["arguments"].as_str().unwrap(), "{v}");
    drop(d);
    remove(&dir);
}

#[test]
fn a_forced_call_is_written_in_the_templates_format_and_parsed_back() {
    // Qwen2.5's way: calls between <tool_call> tags (spelled out: SmolLM2 has no such token).
    let qwen = calling_template("Reply with <tool_call>\\n{...}\\n</tool_call>");
    forced_call_round_trip(
        "qwen-calls",
        &qwen,
        "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":",
        "}\n</tool_call>",
    );
    // Ministral 3's: the name, [ARGS], then the arguments alone.
    let ministral = calling_template("Reply with [TOOL_CALLS]name[ARGS]{...}");
    forced_call_round_trip("ministral-calls", &ministral, "[TOOL_CALLS]get_weather[ARGS]{\"city\":", "}");
}

#[test]
fn tool_use_template_in_its_own_file_is_found() {
    // transformers 4.5x save_pretrained: additional_chat_templates/tool_use.jinja.
    let config = tokenizer_config(Value::Null);
    let dir = folder(
        "files",
        &config,
        &[
            ("chat_template.jinja", "D:{{ messages[0]['content'] }}"),
            ("additional_chat_templates/tool_use.jinja", "T:{{ tools[0]['function']['name'] }}"),
        ],
    );
    let d = Daemon::start_with_model(&dir, &[]);
    let tools: Value = serde_json::from_str(WEATHER).unwrap();
    assert_eq!(rendered(&d, json!({"messages": user("hi")})), "D:hi");
    assert_eq!(rendered(&d, json!({"messages": user("hi"), "tools": tools})), "T:get_weather");
    drop(d);
    remove(&dir);
}

#[test]
fn a_template_reading_message_tools_gets_them_in_the_system_message() {
    // Phi-4-mini-instruct's template: the tools as a JSON text in the system message's `tools`.
    let phi4 = "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and \
                message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + \
                message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + \
                message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}\
                {% else %}{{ eos_token }}{% endif %}";
    let dir = folder("phi4", &tokenizer_config(json!(phi4)), &[]);
    let d = Daemon::start_with_model(&dir, &[]);
    let tools: Value = serde_json::from_str(WEATHER).unwrap();
    let prompt = rendered(&d, json!({"messages": user("Weather in Rome?"), "tools": tools}));
    let expected = r#"<|system|><|tool|>[{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}]<|/tool|><|end|><|user|>Weather in Rome?<|end|><|assistant|>"#;
    assert_eq!(prompt, expected);
    // Without tools, or with tool_choice "none", the template sees none.
    assert_eq!(rendered(&d, json!({"messages": user("hi")})), "<|user|>hi<|end|><|assistant|>");
    let none = rendered(&d, json!({"messages": user("hi"), "tools": tools, "tool_choice": "none"}));
    assert_eq!(none, "<|user|>hi<|end|><|assistant|>");
    // And a forced call still works through it.
    let v = d.chat(
        json!({"messages": user("Weather in Rome?"), "tools": tools, "tool_choice": "required", "max_tokens": 40}),
    );
    let choice = &v["choices"][0];
    assert!(choice["finish_reason"] == "tool_calls" || choice["finish_reason"] == "length", "{v}");
    drop(d);
    remove(&dir);
}

/// The shared genai-layout folder as the Hugging Face cache holds a snapshot: every file a
/// symlink into `blobs/`, where files are named by their hash.
fn hub_cache_snapshot() -> (PathBuf, PathBuf) {
    let source = model_dir().parent().unwrap().join("smollm2-135m-instruct-genai");
    let root = std::env::temp_dir().join(format!("chatd-hub-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (blobs, snapshot) = (root.join("blobs"), root.join("snapshots").join("0123abcd"));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for (i, entry) in std::fs::read_dir(&source).unwrap().flatten().enumerate() {
        let blob = blobs.join(format!("{i:02}e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
        // A hard link where the file system allows it (the blob is 86 MB), else a copy.
        if std::fs::hard_link(entry.path(), &blob).is_err() {
            std::fs::copy(entry.path(), &blob).unwrap();
        }
        let link = Path::new("../../blobs").join(blob.file_name().unwrap());
        std::os::unix::fs::symlink(link, snapshot.join(entry.file_name())).unwrap();
    }
    (root, snapshot)
}

#[test]
fn a_hugging_face_cache_snapshot_loads_and_answers_as_the_folder_does() {
    // ONNX Runtime refuses external data reached through a symlink out of the model's folder;
    // chatd reads it from the blobs the links point to.
    let (root, snapshot) = hub_cache_snapshot();
    let request = json!({"messages": user("What is the capital of France?"), "max_tokens": 12, "temperature": 0});
    let from_cache = Daemon::start_with_model(&snapshot, &[]).chat(request.clone());
    let from_folder =
        Daemon::start_with_model(&model_dir().parent().unwrap().join("smollm2-135m-instruct-genai"), &[]).chat(request);
    assert_eq!(from_cache["choices"][0]["message"], from_folder["choices"][0]["message"]);
    remove(&root);
}
