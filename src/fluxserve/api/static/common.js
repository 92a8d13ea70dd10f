/* Shared by the playground and the operator view: the key kept in this browser, calls to this
   server with it, a Server-Sent Events reader over fetch (EventSource can't send the Key header),
   and a small DOM builder that only ever sets text (server data is never parsed as HTML). */
'use strict';

const FS = (() => {
  const storeName = document.body.dataset.keyStore || 'fluxserve.key';

  function getKey() {
    try { return localStorage.getItem(storeName) || ''; } catch (e) { return ''; }
  }

  function setKey(value) {
    try {
      if (value) localStorage.setItem(storeName, value); else localStorage.removeItem(storeName);
    } catch (e) { /* storage disabled: the key lives until the page closes */ }
    memoryKey = value;
  }

  let memoryKey = getKey();
  const key = () => getKey() || memoryKey;

  /** fetch with the key in a Key header; answers {ok, status, data (parsed JSON or null), headers}. */
  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (key()) headers.Key = key();
    let body;
    if (options.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(options.body);
    }
    const response = await fetch(path, {method: options.method || 'GET', headers, body, signal: options.signal,
                                         cache: 'no-store', credentials: 'omit'});
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    return {ok: response.ok, status: response.status, data, headers: response.headers};
  }

  /** Read an event stream: onEvent(name, data) for each event; resolves when the stream ends. */
  async function events(path, onEvent, signal) {
    const headers = {Accept: 'text/event-stream'};
    if (key()) headers.Key = key();
    const response = await fetch(path, {headers, signal, cache: 'no-store', credentials: 'omit'});
    if (!response.ok || !response.body) {
      let data = null;
      try { data = await response.json(); } catch (e) { data = null; }
      const error = new Error((data && data.message) || `HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    const dispatch = (frame) => {
      let name = 'message';
      const data = [];
      for (const line of frame.split('\n')) {
        if (!line || line.startsWith(':')) continue; // a comment: sse-starlette's pings
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? '' : line.slice(colon + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (field === 'event') name = value;
        else if (field === 'data') data.push(value);
      }
      if (data.length) onEvent(name, data.join('\n'));
    };
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      // normalise line ends, keeping a trailing \r until its \n may arrive
      const keep = buffer.endsWith('\r') ? '\r' : '';
      buffer = buffer.slice(0, buffer.length - keep.length).replace(/\r\n?/g, '\n') + keep;
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        dispatch(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
    if (buffer.trim()) dispatch(buffer.replace(/\r\n?/g, '\n'));
  }

  /** A random UUID (crypto.randomUUID needs a secure context; plain http on a LAN address is not one). */
  function uuid() {
    if (window.crypto && crypto.randomUUID && window.isSecureContext) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  /** el('a', {href: x, class: 'y', onclick: f}, 'text', child, ...): attributes and text only. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name.startsWith('on') && typeof value === 'function') node.addEventListener(name.slice(2), value);
      else if (name === 'class') node.className = value;
      else if (name === 'dataset') Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function when(iso) {
    if (!iso) return '';
    const date = new Date(iso);
    return isNaN(date) ? iso : date.toLocaleString();
  }

  async function copy(text, button) {
    let copied = false;
    try {
      await navigator.clipboard.writeText(text);
      copied = true;
    } catch (e) { // no clipboard permission (plain http on a LAN address): the old way
      const area = el('textarea', {class: 'code', readonly: true});
      area.value = text;
      document.body.append(area);
      area.select();
      try { copied = document.execCommand('copy'); } catch (err) { copied = false; }
      area.remove();
    }
    if (button) {
      const label = button.dataset.label || button.textContent;
      button.dataset.label = label;
      button.textContent = copied ? 'Copied' : 'Copy failed: select the text';
      setTimeout(() => { button.textContent = label; }, 1500);
    }
    return copied;
  }

  /** The key form in the page header: kept in localStorage, shown as its first characters. */
  function setupKeyForm(onChange) {
    const form = document.getElementById('key-form');
    const input = document.getElementById('key');
    const state = document.getElementById('key-state');
    const show = () => {
      const current = key();
      state.textContent = current ? `saved in this browser (${current.slice(0, 6)}…)` : 'no key yet';
      input.value = '';
      input.placeholder = current ? 'saved; paste another to replace it' : 'paste your key once';
    };
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      setKey(value);
      show();
      if (onChange) onChange();
    });
    document.getElementById('key-forget').addEventListener('click', () => {
      setKey('');
      show();
      if (onChange) onChange();
    });
    show();
  }

  return {key, setKey, api, events, uuid, el, when, copy, setupKeyForm};
})();
