//! Lets a run ask for logits at chosen positions only.
//!
//! An exported decoder projects every position's hidden state onto the vocabulary, though a
//! prompt chunk needs the logits of its last position alone: for SmolLM2-135M that projection
//! (49152 x 576) is a fifth of the weights, so a fifth of every prompt run is thrown away. At
//! load, a `Gather` over the sequence axis is put in front of the node that makes the logits,
//! fed by a new input ([`INPUT`], int64 `[n]`): prompt chunks ask for their last position,
//! speculative runs for all, decode steps for their only one. Each row is computed exactly as
//! before (the kernels do not mix rows), so the logits are the same numbers.
//!
//! The edit works on the ONNX protobuf bytes directly: only the graph's node list and inputs
//! change, every other field (and the external weights, loaded from the model's folder) is
//! passed through untouched, so no ONNX library is needed for it.

use anyhow::{Context, Result, bail};

use super::proto::*;

/// The input the edit adds.
pub const INPUT: &str = "chatd_logit_positions";
const HIDDEN_AT: &str = "chatd_hidden_at_positions";

/// `model` (a serialized ModelProto) with the node producing `logits` fed through a `Gather` of
/// the positions in [`INPUT`].
pub fn add_input(model: &[u8], logits: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(model.len() + 256);
    let mut found_graph = false;
    for field in fields(model) {
        let field = field.context("reading the model")?;
        if field.number == MODEL_GRAPH && field.wire == LEN {
            found_graph = true;
            let graph = edit_graph(field.value, logits)?;
            put_bytes(&mut out, MODEL_GRAPH, &graph);
        } else {
            out.extend_from_slice(field.raw);
        }
    }
    if !found_graph {
        bail!("the model has no graph");
    }
    Ok(out)
}

fn edit_graph(graph: &[u8], logits: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(graph.len() + 256);
    let mut edited = false;
    for field in fields(graph) {
        let field = field?;
        if field.number == GRAPH_NODE
            && field.wire == LEN
            && !edited
            && outputs(field.value)?.iter().any(|o| o == logits)
        {
            let input =
                first_input(field.value)?.with_context(|| format!("the node making `{logits}` has no input"))?;
            put_bytes(&mut out, GRAPH_NODE, &gather_node(&input));
            put_bytes(&mut out, GRAPH_NODE, &replace_first_input(field.value, HIDDEN_AT)?);
            edited = true;
        } else {
            out.extend_from_slice(field.raw);
        }
    }
    if !edited {
        bail!("no node makes the output `{logits}`");
    }
    put_bytes(&mut out, GRAPH_INPUT, &positions_input());
    Ok(out)
}

fn outputs(node: &[u8]) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for field in fields(node) {
        let field = field?;
        if field.number == NODE_OUTPUT && field.wire == LEN {
            names.push(String::from_utf8_lossy(field.value).into_owned());
        }
    }
    Ok(names)
}

fn first_input(node: &[u8]) -> Result<Option<String>> {
    for field in fields(node) {
        let field = field?;
        if field.number == NODE_INPUT && field.wire == LEN {
            return Ok(Some(String::from_utf8_lossy(field.value).into_owned()));
        }
    }
    Ok(None)
}

fn replace_first_input(node: &[u8], name: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(node.len() + name.len());
    let mut done = false;
    for field in fields(node) {
        let field = field?;
        if !done && field.number == NODE_INPUT && field.wire == LEN {
            put_bytes(&mut out, NODE_INPUT, name.as_bytes());
            done = true;
        } else {
            out.extend_from_slice(field.raw);
        }
    }
    Ok(out)
}

/// `Gather(hidden, positions, axis=1)`: `[batch, seq, hidden]` -> `[batch, n, hidden]`.
fn gather_node(hidden: &str) -> Vec<u8> {
    let mut axis = Vec::new();
    put_bytes(&mut axis, ATTRIBUTE_NAME, b"axis");
    put_varint_field(&mut axis, ATTRIBUTE_I, 1);
    put_varint_field(&mut axis, ATTRIBUTE_TYPE, ATTRIBUTE_TYPE_INT);
    let mut node = Vec::new();
    put_bytes(&mut node, NODE_INPUT, hidden.as_bytes());
    put_bytes(&mut node, NODE_INPUT, INPUT.as_bytes());
    put_bytes(&mut node, NODE_OUTPUT, HIDDEN_AT.as_bytes());
    put_bytes(&mut node, NODE_NAME, b"chatd_gather_logit_positions");
    put_bytes(&mut node, NODE_OP_TYPE, b"Gather");
    put_bytes(&mut node, NODE_ATTRIBUTE, &axis);
    node
}

/// The ValueInfoProto of [`INPUT`]: int64 `[n]`.
fn positions_input() -> Vec<u8> {
    let mut dim = Vec::new();
    put_bytes(&mut dim, DIM_PARAM, b"logit_positions");
    let mut shape = Vec::new();
    put_bytes(&mut shape, SHAPE_DIM, &dim);
    let mut tensor = Vec::new();
    put_varint_field(&mut tensor, TENSOR_ELEM_TYPE, ELEM_INT64);
    put_bytes(&mut tensor, TENSOR_SHAPE, &shape);
    let mut ty = Vec::new();
    put_bytes(&mut ty, TYPE_TENSOR, &tensor);
    let mut info = Vec::new();
    put_bytes(&mut info, VALUE_INFO_NAME, INPUT.as_bytes());
    put_bytes(&mut info, VALUE_INFO_TYPE, &ty);
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(inputs: &[&str], outputs: &[&str], op: &str) -> Vec<u8> {
        let mut n = Vec::new();
        for i in inputs {
            put_bytes(&mut n, NODE_INPUT, i.as_bytes());
        }
        for o in outputs {
            put_bytes(&mut n, NODE_OUTPUT, o.as_bytes());
        }
        put_bytes(&mut n, NODE_OP_TYPE, op.as_bytes());
        n
    }

    #[test]
    fn gathers_in_front_of_the_logits_node_and_keeps_the_rest() {
        let mut graph = Vec::new();
        put_bytes(&mut graph, GRAPH_NODE, &node(&["x"], &["h"], "Norm"));
        put_bytes(&mut graph, GRAPH_NODE, &node(&["h", "w"], &["logits"], "MatMulNBits"));
        put_bytes(&mut graph, 2, b"graph-name");
        let mut model = Vec::new();
        put_varint_field(&mut model, 1, 8);
        put_bytes(&mut model, MODEL_GRAPH, &graph);
        put_bytes(&mut model, 8, b"opset");

        let edited = add_input(&model, "logits").unwrap();
        let top: Vec<_> = fields(&edited).map(Result::unwrap).collect();
        assert_eq!(top.iter().map(|f| f.number).collect::<Vec<_>>(), vec![1, MODEL_GRAPH, 8]);
        assert_eq!(top[0].raw, &model[..2]);
        let graph: Vec<_> = fields(top[1].value).map(Result::unwrap).collect();
        assert_eq!(graph.iter().map(|f| f.number).collect::<Vec<_>>(), vec![1, 1, 1, 2, GRAPH_INPUT]);
        assert_eq!(outputs(graph[1].value).unwrap(), vec![HIDDEN_AT]);
        assert_eq!(first_input(graph[1].value).unwrap().unwrap(), "h");
        assert_eq!(first_input(graph[2].value).unwrap().unwrap(), HIDDEN_AT);
        assert_eq!(outputs(graph[2].value).unwrap(), vec!["logits"]);

        assert!(add_input(&model, "nothing").unwrap_err().to_string().contains("no node makes"));
        assert!(add_input(&model[..model.len() - 3], "logits").is_err());
    }
}
