//! Typed reads of optional request fields, each failing with a 400 that names the field.

use std::cell::RefCell;

use serde_json::{Map, Value};

use super::ApiError;

/// A request object's fields, remembering which ones were read, so that what nothing read can
/// be refused by name instead of ignored (see `compat::refuse_unread`).
pub(super) struct Fields<'a> {
    obj: &'a Map<String, Value>,
    read: RefCell<Vec<&'a str>>,
}

impl<'a> Fields<'a> {
    pub fn new(obj: &'a Map<String, Value>) -> Self {
        Self { obj, read: RefCell::new(Vec::new()) }
    }

    /// The field, treating an explicit `null` as absent (clients send both).
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        let (name, value) = self.obj.get_key_value(key)?;
        self.read.borrow_mut().push(name);
        Some(value).filter(|v| !v.is_null())
    }

    /// Fields given (not `null`) that no `get` has asked for.
    pub fn unread(&self) -> impl Iterator<Item = (&'a str, &'a Value)> {
        let read = self.read.borrow().clone();
        self.obj.iter().filter(move |(k, v)| !v.is_null() && !read.contains(&k.as_str())).map(|(k, v)| (k.as_str(), v))
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(key, "a boolean", other)),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(key, "a string", other)),
        }
    }

    /// A number within `[min, max]`.
    pub fn number(&self, key: &str, min: f64, max: f64) -> Result<Option<f32>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let v = n.as_f64().unwrap_or(f64::NAN);
                if !(min..=max).contains(&v) {
                    return Err(ApiError::invalid(key, format!("`{key}` must be between {min} and {max}, got {v}")));
                }
                Ok(Some(v as f32))
            }
            Some(other) => Err(wrong_type(key, "a number", other)),
        }
    }

    /// An integer within `[min, max]`.
    pub fn int(&self, key: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let v = match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => i,
                    (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => f as i64,
                    // Above i64: out of every range asked for here (seed's included).
                    _ if n.is_u64() => {
                        return Err(ApiError::invalid(
                            key,
                            format!("`{key}` must be between {min} and {max}, got {n}"),
                        ));
                    }
                    _ => {
                        return Err(ApiError::invalid(key, format!("`{key}` must be an integer, got {n}")));
                    }
                };
                if v < min || v > max {
                    return Err(ApiError::invalid(key, format!("`{key}` must be between {min} and {max}, got {v}")));
                }
                Ok(Some(v))
            }
            Some(other) => Err(wrong_type(key, "an integer", other)),
        }
    }

    /// A string or a list of strings (`stop`), at most `max_count` of at most `max_len` bytes,
    /// checked before anything is copied.
    pub fn strings(&self, key: &str, max_count: usize, max_len: usize) -> Result<Vec<String>, ApiError> {
        let expected = "a string or an array of strings";
        let list: Vec<&str> = match self.get(key) {
            None => return Ok(Vec::new()),
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().ok_or_else(|| wrong_type(key, expected, v)))
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(wrong_type(key, expected, other)),
        };
        if list.len() > max_count {
            return Err(ApiError::invalid(
                key,
                format!("`{key}` takes at most {max_count} strings, got {}", list.len()),
            ));
        }
        if let Some(long) = list.iter().find(|s| s.len() > max_len) {
            return Err(ApiError::invalid(
                key,
                format!("each `{key}` string must be at most {max_len} bytes, got {}", long.len()),
            ));
        }
        Ok(list.into_iter().map(str::to_owned).collect())
    }
}

/// A request body, which must be a JSON object.
pub(super) fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_json(format!(
            "We could not parse the JSON body of your request ({e}). The body must be a JSON object."
        ))
    })?;
    match value {
        Value::Object(obj) => Ok(obj),
        _ => Err(ApiError::bad_json("The request body must be a JSON object.")),
    }
}

pub(super) fn wrong_type(key: &str, expected: &str, got: &Value) -> ApiError {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::invalid(key, format!("`{key}` must be {expected}, got {kind}"))
}
