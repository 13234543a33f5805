//! Just enough of the protobuf wire format to read and edit an ONNX model's graph in place
//! (see `logit_positions` and `kv_quant`) and to read its nodes' attributes, without an ONNX library.

use anyhow::{Context, Result, bail};

// Field numbers of onnx.proto3 that chatd reads or writes.
pub(super) const MODEL_GRAPH: u32 = 7;
pub(super) const GRAPH_NODE: u32 = 1;
pub(super) const GRAPH_INPUT: u32 = 11;
pub(super) const GRAPH_OUTPUT: u32 = 12;
pub(super) const GRAPH_VALUE_INFO: u32 = 13;
pub(super) const GRAPH_INITIALIZER: u32 = 5;
pub(super) const TENSOR_EXTERNAL_DATA: u32 = 13;
pub(super) const ENTRY_KEY: u32 = 1;
pub(super) const ENTRY_VALUE: u32 = 2;
pub(super) const NODE_INPUT: u32 = 1;
pub(super) const NODE_OUTPUT: u32 = 2;
pub(super) const NODE_NAME: u32 = 3;
pub(super) const NODE_OP_TYPE: u32 = 4;
pub(super) const NODE_ATTRIBUTE: u32 = 5;
pub(super) const ATTRIBUTE_NAME: u32 = 1;
pub(super) const ATTRIBUTE_I: u32 = 3;
pub(super) const ATTRIBUTE_S: u32 = 4;
pub(super) const ATTRIBUTE_TYPE: u32 = 20;
pub(super) const ATTRIBUTE_TYPE_INT: u64 = 2;
pub(super) const ATTRIBUTE_TYPE_STRING: u64 = 3;
pub(super) const VALUE_INFO_NAME: u32 = 1;
pub(super) const VALUE_INFO_TYPE: u32 = 2;
pub(super) const TYPE_TENSOR: u32 = 1;
pub(super) const TENSOR_ELEM_TYPE: u32 = 1;
pub(super) const TENSOR_SHAPE: u32 = 2;
pub(super) const SHAPE_DIM: u32 = 1;
pub(super) const DIM_VALUE: u32 = 1;
pub(super) const DIM_PARAM: u32 = 2;
pub(super) const TENSOR_PROTO_DIMS: u32 = 1;
pub(super) const TENSOR_PROTO_DATA_TYPE: u32 = 2;
pub(super) const TENSOR_PROTO_NAME: u32 = 8;
pub(super) const TENSOR_PROTO_RAW_DATA: u32 = 9;
// TensorProto.DataType values.
pub(super) const ELEM_FLOAT: u64 = 1;
pub(super) const ELEM_UINT8: u64 = 2;
pub(super) const ELEM_INT8: u64 = 3;
pub(super) const ELEM_INT64: u64 = 7;

// Wire types.
pub(super) const VARINT: u8 = 0;
pub(super) const LEN: u8 = 2;

/// One field of a protobuf message: its number, wire type, payload (for length-delimited
/// fields, the bytes inside) and the whole encoding (key included) for passing it through.
pub(super) struct Field<'a> {
    pub number: u32,
    pub wire: u8,
    pub value: &'a [u8],
    pub raw: &'a [u8],
}

pub(super) fn fields(message: &[u8]) -> impl Iterator<Item = Result<Field<'_>>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= message.len() {
            return None;
        }
        let start = at;
        let field = (|| {
            let key = read_varint(message, &mut at)?;
            let wire = (key & 7) as u8;
            let number = u32::try_from(key >> 3).context("field number out of range")?;
            let value = match wire {
                VARINT => {
                    let from = at;
                    read_varint(message, &mut at)?;
                    &message[from..at]
                }
                1 => take(message, &mut at, 8)?,
                LEN => {
                    let len = usize::try_from(read_varint(message, &mut at)?).context("length out of range")?;
                    take(message, &mut at, len)?
                }
                5 => take(message, &mut at, 4)?,
                other => bail!("unsupported protobuf wire type {other}"),
            };
            Ok(Field { number, wire, value, raw: &message[start..at] })
        })();
        if field.is_err() {
            at = message.len();
        }
        Some(field)
    })
}

fn take<'a>(message: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8]> {
    let end = at.checked_add(len).filter(|&e| e <= message.len()).context("truncated protobuf field")?;
    let value = &message[*at..end];
    *at = end;
    Ok(value)
}

pub(super) fn read_varint(message: &[u8], at: &mut usize) -> Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *message.get(*at).context("truncated protobuf varint")?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    bail!("protobuf varint too long")
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub(super) fn put_varint_field(out: &mut Vec<u8>, number: u32, value: u64) {
    put_varint(out, u64::from(number) << 3 | u64::from(VARINT));
    put_varint(out, value);
}

pub(super) fn put_bytes(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    put_varint(out, u64::from(number) << 3 | u64::from(LEN));
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The `location` of every external-data initializer of the main graph, each once.
pub(super) fn external_locations(model: &[u8]) -> Result<Vec<String>> {
    let mut found = Vec::new();
    edit_locations(model, &mut |location| {
        if !found.iter().any(|l| l == location) {
            found.push(location.to_owned());
        }
        None
    })?;
    Ok(found)
}

/// `model` with each external-data `location` of the main graph's initializers replaced by
/// what `rename` gives for it (kept when it gives `None`).
pub(super) fn rename_locations(model: &[u8], rename: &mut dyn FnMut(&str) -> Option<String>) -> Result<Vec<u8>> {
    edit_locations(model, rename)
}

fn edit_locations(model: &[u8], rename: &mut dyn FnMut(&str) -> Option<String>) -> Result<Vec<u8>> {
    // Each level is copied field by field; only the fields on the way to a location change.
    let mut entry = |entry: &[u8]| -> Result<Vec<u8>> {
        let mut key = &b""[..];
        let mut value = None;
        for field in fields(entry) {
            let field = field?;
            match field.number {
                ENTRY_KEY => key = field.value,
                ENTRY_VALUE => value = Some(field.value),
                _ => {}
            }
        }
        let renamed = match (key, value) {
            (b"location", Some(v)) => rename(std::str::from_utf8(v).context("an external data location is not UTF-8")?),
            _ => None,
        };
        Ok(match renamed {
            Some(new) => {
                let mut out = Vec::new();
                put_bytes(&mut out, ENTRY_KEY, b"location");
                put_bytes(&mut out, ENTRY_VALUE, new.as_bytes());
                out
            }
            None => entry.to_vec(),
        })
    };
    let mut tensor = |t: &[u8]| edit_fields(t, TENSOR_EXTERNAL_DATA, &mut entry);
    let mut graph = |g: &[u8]| edit_fields(g, GRAPH_INITIALIZER, &mut tensor);
    edit_fields(model, MODEL_GRAPH, &mut graph)
}

/// `message` with each length-delimited field `number` replaced by `inner` of it.
pub(super) fn edit_fields(
    message: &[u8],
    number: u32,
    inner: &mut dyn FnMut(&[u8]) -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(message.len());
    for field in fields(message) {
        let field = field?;
        if field.number == number && field.wire == LEN {
            put_bytes(&mut out, number, &inner(field.value)?);
        } else {
            out.extend_from_slice(field.raw);
        }
    }
    Ok(out)
}

/// The `local_window_size` of each `GroupQueryAttention` node of a serialized ModelProto (-1:
/// none, as the attribute's default), in graph order.
pub(super) fn attention_windows(model: &[u8]) -> Result<Vec<i64>> {
    let mut windows = Vec::new();
    for field in fields(model) {
        let field = field?;
        if field.number != MODEL_GRAPH || field.wire != LEN {
            continue;
        }
        for node in fields(field.value) {
            let node = node?;
            if node.number != GRAPH_NODE || node.wire != LEN {
                continue;
            }
            let mut is_gqa = false;
            let mut window = -1;
            for part in fields(node.value) {
                let part = part?;
                match (part.number, part.wire) {
                    (NODE_OP_TYPE, LEN) => is_gqa = part.value == b"GroupQueryAttention",
                    (NODE_ATTRIBUTE, LEN) => {
                        let (mut name, mut value) = (&b""[..], None);
                        for a in fields(part.value) {
                            let a = a?;
                            match (a.number, a.wire) {
                                (ATTRIBUTE_NAME, LEN) => name = a.value,
                                (ATTRIBUTE_I, VARINT) => value = Some(read_varint(a.value, &mut 0)? as i64),
                                _ => {}
                            }
                        }
                        if name == b"local_window_size"
                            && let Some(v) = value
                        {
                            window = v;
                        }
                    }
                    _ => {}
                }
            }
            if is_gqa {
                windows.push(window);
            }
        }
    }
    Ok(windows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gqa_node(window: Option<i64>) -> Vec<u8> {
        let mut node = Vec::new();
        put_bytes(&mut node, NODE_OP_TYPE, b"GroupQueryAttention");
        if let Some(w) = window {
            let mut attribute = Vec::new();
            put_bytes(&mut attribute, ATTRIBUTE_NAME, b"local_window_size");
            put_varint_field(&mut attribute, ATTRIBUTE_I, w as u64);
            put_varint_field(&mut attribute, ATTRIBUTE_TYPE, ATTRIBUTE_TYPE_INT);
            put_bytes(&mut node, NODE_ATTRIBUTE, &attribute);
        }
        node
    }

    #[test]
    fn attention_windows_are_read_from_each_gqa_node() {
        let mut graph = Vec::new();
        put_bytes(&mut graph, GRAPH_NODE, &gqa_node(Some(4096)));
        put_bytes(&mut graph, GRAPH_NODE, &gqa_node(None));
        let mut other = Vec::new();
        put_bytes(&mut other, NODE_OP_TYPE, b"MatMul");
        put_bytes(&mut graph, GRAPH_NODE, &other);
        let mut model = Vec::new();
        put_bytes(&mut model, MODEL_GRAPH, &graph);
        assert_eq!(attention_windows(&model).unwrap(), vec![4096, -1]);
    }

    #[test]
    fn external_data_locations_are_found_and_renamed_leaving_the_rest() {
        let tensor = |location: &str| {
            let mut t = Vec::new();
            put_bytes(&mut t, 8, b"weight");
            for (k, v) in [("location", location), ("offset", "0")] {
                let mut entry = Vec::new();
                put_bytes(&mut entry, ENTRY_KEY, k.as_bytes());
                put_bytes(&mut entry, ENTRY_VALUE, v.as_bytes());
                put_bytes(&mut t, TENSOR_EXTERNAL_DATA, &entry);
            }
            t
        };
        let mut graph = Vec::new();
        put_bytes(&mut graph, GRAPH_INITIALIZER, &tensor("model.onnx.data"));
        put_bytes(&mut graph, GRAPH_INITIALIZER, &tensor("model.onnx.data"));
        put_bytes(&mut graph, GRAPH_NODE, &gqa_node(None));
        let mut model = Vec::new();
        put_varint_field(&mut model, 1, 8);
        put_bytes(&mut model, MODEL_GRAPH, &graph);
        assert_eq!(external_locations(&model).unwrap(), vec!["model.onnx.data"]);
        let renamed = rename_locations(&model, &mut |l| Some(format!("blob-of-{l}"))).unwrap();
        assert_eq!(external_locations(&renamed).unwrap(), vec!["blob-of-model.onnx.data"]);
        assert_eq!(attention_windows(&renamed).unwrap(), vec![-1]);
        let same = rename_locations(&model, &mut |_| None).unwrap();
        assert_eq!(same, model);
    }
}
