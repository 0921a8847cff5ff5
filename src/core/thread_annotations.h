// Clang's thread-safety annotations (-Wthread-safety), modelled on LevelDB's
// port/thread_annotations.h: the compiler checks that a member marked
// GUARDED_BY(mu_) is touched only with mu_ held, that a function marked
// REQUIRES(mu_) is called only with it held, and so on. They are no-ops for
// other compilers. The annotated lock types are in core/mutex.h (libstdc++'s
// std::mutex carries no annotations, so the analysis cannot see it).
//
//   Mutex mu_;
//   int count_ GUARDED_BY(mu_) = 0;
//   void bump_locked() REQUIRES(mu_);
//   void bump() EXCLUDES(mu_) { MutexLock lock(&mu_); bump_locked(); }
//
// `make ci-thread-safety` (and so `make test`) builds the tree with clang
// and -Wthread-safety -Werror.
#pragma once

#if defined(__clang__) && !defined(SWIG)
#define WEFT_THREAD_ANNOTATION_(x) __attribute__((x))
#else
#define WEFT_THREAD_ANNOTATION_(x)
#endif

// On a class: its objects are capabilities (locks), named "mutex" in messages.
#ifndef CAPABILITY
#define CAPABILITY(x) WEFT_THREAD_ANNOTATION_(capability(x))
#endif
// On a class: an RAII object that holds a capability for its lifetime.
#ifndef SCOPED_CAPABILITY
#define SCOPED_CAPABILITY WEFT_THREAD_ANNOTATION_(scoped_lockable)
#endif
// On a member: read and written only with the capability held.
#ifndef GUARDED_BY
#define GUARDED_BY(x) WEFT_THREAD_ANNOTATION_(guarded_by(x))
#endif
// On a pointer member: what it points to is guarded (the pointer itself is not).
#ifndef PT_GUARDED_BY
#define PT_GUARDED_BY(x) WEFT_THREAD_ANNOTATION_(pt_guarded_by(x))
#endif
// On a capability: the order in which it is taken relative to others.
#ifndef ACQUIRED_AFTER
#define ACQUIRED_AFTER(...) WEFT_THREAD_ANNOTATION_(acquired_after(__VA_ARGS__))
#endif
#ifndef ACQUIRED_BEFORE
#define ACQUIRED_BEFORE(...) WEFT_THREAD_ANNOTATION_(acquired_before(__VA_ARGS__))
#endif
// On a function: the caller holds the capability (exclusively / shared).
#ifndef REQUIRES
#define REQUIRES(...) WEFT_THREAD_ANNOTATION_(requires_capability(__VA_ARGS__))
#endif
#ifndef REQUIRES_SHARED
#define REQUIRES_SHARED(...) WEFT_THREAD_ANNOTATION_(requires_shared_capability(__VA_ARGS__))
#endif
// On a function: it takes / gives back the capability (no argument: `this`).
#ifndef ACQUIRE
#define ACQUIRE(...) WEFT_THREAD_ANNOTATION_(acquire_capability(__VA_ARGS__))
#endif
#ifndef ACQUIRE_SHARED
#define ACQUIRE_SHARED(...) WEFT_THREAD_ANNOTATION_(acquire_shared_capability(__VA_ARGS__))
#endif
#ifndef RELEASE
#define RELEASE(...) WEFT_THREAD_ANNOTATION_(release_capability(__VA_ARGS__))
#endif
#ifndef RELEASE_SHARED
#define RELEASE_SHARED(...) WEFT_THREAD_ANNOTATION_(release_shared_capability(__VA_ARGS__))
#endif
// On a function: it tries to take the capability and returns the first argument on success.
#ifndef TRY_ACQUIRE
#define TRY_ACQUIRE(...) WEFT_THREAD_ANNOTATION_(try_acquire_capability(__VA_ARGS__))
#endif
#ifndef TRY_ACQUIRE_SHARED
#define TRY_ACQUIRE_SHARED(...) WEFT_THREAD_ANNOTATION_(try_acquire_shared_capability(__VA_ARGS__))
#endif
// On a function: the caller must not hold the capability (the function takes it).
#ifndef EXCLUDES
#define EXCLUDES(...) WEFT_THREAD_ANNOTATION_(locks_excluded(__VA_ARGS__))
#endif
// On a function: it checks (at run time, or by contract) that the capability is held.
#ifndef ASSERT_CAPABILITY
#define ASSERT_CAPABILITY(x) WEFT_THREAD_ANNOTATION_(assert_capability(x))
#endif
// On a function: it returns a reference to the capability.
#ifndef RETURN_CAPABILITY
#define RETURN_CAPABILITY(x) WEFT_THREAD_ANNOTATION_(lock_returned(x))
#endif
// On a function: not checked; say why next to it.
#ifndef NO_THREAD_SAFETY_ANALYSIS
#define NO_THREAD_SAFETY_ANALYSIS WEFT_THREAD_ANNOTATION_(no_thread_safety_analysis)
#endif
