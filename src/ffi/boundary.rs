//! What every exported function needs at the edge: a panic boundary (unwinding into C is
//! undefined behaviour), the thread's last error message, and checked pointer arguments.

use std::cell::RefCell;
use std::ffi::{CStr, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::status::{Failure, chat_status};

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Runs a fallible body: `CHAT_OK` and a cleared last error on success, the failure's status
/// and message otherwise, `CHAT_PANIC` if it panicked.
pub(super) fn guard(body: impl FnOnce() -> Result<(), Failure>) -> chat_status {
    let (status, message) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => (chat_status::CHAT_OK, String::new()),
        Ok(Err(failure)) => (failure.status, failure.message),
        Err(panic) => (chat_status::CHAT_PANIC, format!("libchat panicked: {}", panic_message(&*panic))),
    };
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
    status
}

/// Runs an infallible body, returning `fallback` if it panicked.
pub(super) fn guard_or<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("?")
}

/// The calling thread's last error message ("" after a success).
pub(super) fn last_error() -> String {
    LAST_ERROR.with(|e| e.borrow().clone())
}

/// A non-NULL pointer argument as a reference.
///
/// # Safety
/// `ptr` is NULL or valid for reads as a `T` for `'a`.
pub(super) unsafe fn arg<'a, T>(ptr: *const T, name: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller promises validity when non-NULL.
    unsafe { ptr.as_ref() }.ok_or_else(|| null(name))
}

/// A non-NULL output pointer.
pub(super) fn out<T>(ptr: *mut T, name: &str) -> Result<*mut T, Failure> {
    if ptr.is_null() { Err(null(name)) } else { Ok(ptr) }
}

/// A NUL-terminated string argument.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that lives for `'a`.
pub(super) unsafe fn arg_cstr<'a>(ptr: *const c_char, name: &str) -> Result<&'a CStr, Failure> {
    if ptr.is_null() {
        return Err(null(name));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    Ok(unsafe { CStr::from_ptr(ptr) })
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// As for [`arg_cstr`].
pub(super) unsafe fn arg_str<'a>(ptr: *const c_char, name: &str) -> Result<&'a str, Failure> {
    // SAFETY: forwarded contract.
    let s = unsafe { arg_cstr(ptr, name) }?;
    s.to_str().map_err(|e| Failure::new(chat_status::CHAT_INVALID_ARGUMENT, format!("`{name}` is not UTF-8: {e}")))
}

fn null(name: &str) -> Failure {
    Failure::new(chat_status::CHAT_INVALID_ARGUMENT, format!("`{name}` is NULL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = guard(|| panic!("deliberate"));
        assert_eq!(status, chat_status::CHAT_PANIC);
        assert_eq!(last_error(), "libchat panicked: deliberate");
        assert_eq!(guard(|| Ok(())), chat_status::CHAT_OK);
        assert_eq!(last_error(), "");
        assert_eq!(guard_or(7, || -> i32 { panic!("again") }), 7);
    }
}
