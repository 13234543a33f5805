// libchat.hpp: a header-only C++17 wrapper over libchat's C API (libchat.h).
//
//   c++ -std=c++17 prog.cpp -I bindings/cpp $(pkg-config --cflags --libs libchat)
//
// Errors: every failing call throws libchat::Error, which carries the chat_status and the
// message libchat gave (chat_last_error, read on the failing call's own thread).
//
// Ownership: an Engine owns its chat_engine and frees it in its destructor. It is move-only;
// a moved-from Engine holds no engine, and calling it throws Error(CHAT_INVALID_ARGUMENT).
// Strings returned by libchat are copied into std::string and released at once with
// chat_string_free, so callers never see a libchat-owned pointer.
//
// Thread safety: all Engine methods are const and the C engine is thread-safe, so one Engine
// may serve any number of threads at once (their requests are batched together). Destroying
// or moving from an Engine must not overlap with calls on it, as for any C++ object.
#ifndef LIBCHAT_HPP
#define LIBCHAT_HPP

#include <libchat.h>

#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace libchat {

// A failed libchat call: what() is "<status description>: <libchat's message>".
class Error : public std::runtime_error {
public:
    Error(chat_status status, const std::string& message) : std::runtime_error(message), status_(status) {}

    chat_status status() const noexcept { return status_; }

private:
    chat_status status_;
};

namespace detail {

// The calling thread's last libchat error. Its length is returned even when the buffer is too
// small, so one retry with the exact size always fits.
inline std::string last_error() {
    std::string message(256, '\0');
    std::size_t len = chat_last_error(message.data(), message.size());
    if (len >= message.size()) {
        message.resize(len + 1);
        chat_last_error(message.data(), message.size());
    }
    message.resize(len);
    return message;
}

// Must be called right after the failing call, before any other libchat call on this thread
// replaces the message.
[[noreturn]] inline void throw_error(chat_status status) {
    std::string message = last_error();
    std::string what = chat_status_str(status);
    if (!message.empty()) {
        what += ": " + message;
    }
    throw Error(status, what);
}

struct StringFree {
    void operator()(char* s) const noexcept { chat_string_free(s); }
};

struct EngineFree {
    void operator()(chat_engine* engine) const noexcept { chat_engine_free(engine); }
};

// A string returned by libchat, owned from the moment the call returns so no path leaks it.
using String = std::unique_ptr<char, StringFree>;

}  // namespace detail

// Library version at run time, e.g. "0.1.0" (LIBCHAT_VERSION_* give the compiled-against one).
inline std::string version() { return chat_version(); }

class Engine {
public:
    // Loads the model and starts the engine; `config_json` is documented at chat_engine_new.
    explicit Engine(const std::string& config_json) {
        chat_engine* engine = nullptr;
        chat_status status = chat_engine_new(config_json.c_str(), &engine);
        if (status != CHAT_OK) {
            detail::throw_error(status);
        }
        engine_.reset(engine);
    }

    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;
    Engine(Engine&&) noexcept = default;
    Engine& operator=(Engine&&) noexcept = default;
    // Waits for calls still running on other threads, then frees the engine (chat_engine_free).
    ~Engine() = default;

    // A /v1/chat/completions request in, the chat.completion response JSON out. Blocks.
    std::string chat(const std::string& request_json) const { return call(chat_engine_chat, request_json); }

    // A /v1/completions request in, the text_completion response JSON out. Blocks.
    std::string complete(const std::string& request_json) const {
        return call(chat_engine_complete, request_json);
    }

    // As chat(), handing each new piece of text to `on_delta` on this thread as it is generated;
    // returns the full response JSON. `on_delta` returning false cancels the request: this then
    // throws Error with status() == CHAT_CANCELLED. An exception thrown by `on_delta` cancels
    // the request too, and is rethrown here unchanged once libchat has returned.
    std::string chat_stream(const std::string& request_json,
                            const std::function<bool(std::string_view)>& on_delta) const {
        Stream stream{on_delta, nullptr};
        char* response = nullptr;
        chat_status status =
            chat_engine_chat_stream(engine_.get(), request_json.c_str(), &Stream::deliver, &stream, &response);
        detail::String owned(response);
        if (stream.error) {
            std::rethrow_exception(stream.error);
        }
        if (status != CHAT_OK) {
            detail::throw_error(status);
        }
        return owned.get();
    }

private:
    using Call = chat_status (*)(const chat_engine*, const char*, char**);

    std::string call(Call fn, const std::string& request_json) const {
        char* response = nullptr;
        chat_status status = fn(engine_.get(), request_json.c_str(), &response);
        detail::String owned(response);
        if (status != CHAT_OK) {
            detail::throw_error(status);
        }
        return owned.get();
    }

    struct Stream {
        const std::function<bool(std::string_view)>& on_delta;
        std::exception_ptr error;

        // The C callback. An exception must not unwind through libchat's frames (undefined
        // behaviour across a C ABI), so it is caught here, kept for chat_stream to rethrow, and
        // turned into a cancel.
        static bool deliver(void* userdata, const char* text, std::size_t len) noexcept {
            auto* stream = static_cast<Stream*>(userdata);
            try {
                return stream->on_delta(std::string_view(text, len));
            } catch (...) {
                stream->error = std::current_exception();
                return false;
            }
        }
    };

    std::unique_ptr<chat_engine, detail::EngineFree> engine_;
};

}  // namespace libchat

#endif  // LIBCHAT_HPP
